"""The docs stay true to the code: every config key is documented with its default, and every
repository path and relative link in README.md and docs/*.md points at something that exists."""

from __future__ import annotations

import re
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from msgspec import Struct

from sidecar import config, settings

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = ROOT / "docs" / "configuration.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages that are being written separately: a link to one is skipped while it does not exist.
LATER = {ROOT / "docs" / "architecture.md", ROOT / "docs" / "testing.md"}

HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
TABLE_KEY = re.compile(r"^\|\s*`([^`]+)`\s*\|")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
# A repository path as the docs write one: not part of a longer path, URL or file name
# (`/etc/llm-sidecar/sidecar.toml` names no `sidecar/...` here).
REPO_PATH = re.compile(
    r"(?<![\w./~-])(?:(?:sidecar|tests)/[\w./-]*\.py(?![\w.])|config/[\w./-]*\w)"
)


@dataclass(frozen=True)
class Section:
    """One table of the config: its dotted path, as `[path]` in TOML, and its keys."""

    path: str  # "server", "providers.NAME", "models.NAME.targets"
    struct: type[Struct]
    keys: tuple[str, ...]

    @property
    def tag(self) -> str | None:
        """`kind = "openai"` for a tagged table, which shares its path with another."""
        struct_config = self.struct.__struct_config__
        if struct_config.tag_field is None:
            return None
        return f'{struct_config.tag_field} = "{struct_config.tag}"'


def internal_fields() -> set[str]:
    """Fields of Settings that load() fills in and a config file may not set: the loader
    refuses them by name, so they are found by asking it rather than by a second list here."""
    names = set()
    for field in msgspec.structs.fields(settings.Settings):
        try:
            config.from_mapping({field.name: None})
        except config.ConfigError as exc:
            if f"unknown key `{field.name}`" in str(exc):
                names.add(field.name)
    return names


def nested_structs(kind: Any) -> tuple[str, list[type[Struct]]]:
    """The Structs a field's type holds, and the suffix its path takes: ".NAME" for a table
    of named entries (providers, models)."""
    origin = typing.get_origin(kind)
    if origin is typing.Annotated:
        return nested_structs(typing.get_args(kind)[0])
    if isinstance(kind, type) and issubclass(kind, Struct):
        return "", [kind]
    if origin in (typing.Union, types.UnionType, list):
        found = [s for arg in typing.get_args(kind) for s in nested_structs(arg)[1]]
        return "", found
    if origin is dict:
        return ".NAME", nested_structs(typing.get_args(kind)[1])[1]
    return "", []


def list_of_tables(kind: Any) -> bool:
    if typing.get_origin(kind) is typing.Annotated:
        return list_of_tables(typing.get_args(kind)[0])
    return typing.get_origin(kind) is list


def config_sections(struct: type[Struct], path: str, skip: set[str]) -> Iterator[Section]:
    struct_config = struct.__struct_config__
    keys = [struct_config.tag_field] if struct_config.tag_field else []
    for field in msgspec.structs.fields(struct):
        if field.name in skip:
            continue
        suffix, nested = nested_structs(field.type)
        if not nested or list_of_tables(field.type):
            # `targets = [ {...}, ... ]` is a key of its own table as well as a table.
            keys.append(field.name)
        if not nested:
            continue
        inner = f"{path}.{field.name}" if path else field.name
        for child in nested:
            yield from config_sections(child, inner + suffix, set())
    yield Section(path, struct, tuple(keys))


def all_sections() -> list[Section]:
    return list(config_sections(settings.Settings, "", internal_fields()))


def prose_lines(text: str) -> Iterator[tuple[bool, str]]:
    """Each line of a page, and whether it is inside a fenced code block."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            yield True, line
            continue
        yield fenced, line


def split_sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading, lines up to the next heading) for every heading outside code blocks."""
    parts: list[tuple[str, list[str]]] = [("", [])]
    for fenced, line in prose_lines(text):
        match = None if fenced else HEADING.match(line)
        if match:
            parts.append((match.group(2), []))
        else:
            parts[-1][1].append(line)
    return parts


def documented_rows(section: Section, text: str) -> dict[str, list[str]] | None:
    """The table rows (key -> cells) under the heading that names this section, or None
    when no heading does. The heading writes the path in backticks, `[server]` or
    `models.NAME.targets`, and a tagged table its tag as well."""
    named = re.compile(rf"`\[?{re.escape(section.path)}\]?`")
    for heading, lines in split_sections(text):
        if not named.search(heading) or (section.tag and section.tag not in heading):
            continue
        rows = {}
        for line in lines:
            match = TABLE_KEY.match(line)
            if match:
                rows[match.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
        return rows
    return None


def test_the_walk_finds_every_table_of_the_config() -> None:
    # A walk that silently found nothing would make the tests below pass on any page.
    paths = {(s.path, s.tag) for s in all_sections()}
    assert {("server", None), ("providers.NAME", 'kind = "openai"'),
            ("providers.NAME", 'kind = "local"'), ("models.NAME", None),
            ("models.NAME.targets", None), ("routing", None), ("auth", None), ("limits", None),
            ("cache", None), ("logging", None)} <= paths
    assert "source" in internal_fields()


def test_every_config_key_is_documented_in_its_section() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    missing = []
    for section in all_sections():
        rows = documented_rows(section, text) if section.path else {}
        for key in section.keys:
            dotted = f"`{section.path}.{key}`" if section.path else f"`{key}`"
            if (rows is None or key not in rows) and dotted not in text:
                missing.append(f"{section.path or '(top level)'}.{key}".lstrip("."))
    assert missing == [], f"config keys missing from docs/configuration.md: {missing}"


def test_every_documented_key_is_a_config_key() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    stale = []
    for section in all_sections():
        rows = documented_rows(section, text) if section.path else None
        for key in rows or {}:
            if key not in section.keys:
                stale.append(f"{section.path}.{key}")
    assert stale == [], f"docs/configuration.md documents keys the config lacks: {stale}"


def test_documented_defaults_are_the_defaults_in_the_code() -> None:
    # The default column holds a TOML value in backticks, "required" for a key without a
    # default, or words for a key whose default is unset (None): each is checked.
    text = CONFIGURATION.read_text(encoding="utf-8")
    wrong = []
    for section in all_sections():
        rows = documented_rows(section, text) if section.path else None
        fields = {f.name: f for f in msgspec.structs.fields(section.struct)}
        for key, cells in (rows or {}).items():
            if key not in fields or len(cells) < 3:
                continue  # a stale key is the test above's business; the tag has no default
            field, cell = fields[key], cells[2]
            if field.default is not msgspec.NODEFAULT:
                default: object = field.default
            elif field.default_factory is not msgspec.NODEFAULT:
                default = field.default_factory()
            else:
                if cell != "required":
                    wrong.append(f"{section.path}.{key}: documented {cell}, but it is required")
                continue
            literal = re.fullmatch(r"`([^`]+)`", cell)
            if literal:
                documented = tomllib.loads(f"value = {literal.group(1)}")["value"]
                # `true` == 1 in Python; a boolean documented for a number is still wrong.
                same_kind = isinstance(documented, bool) == isinstance(default, bool)
                if documented != default or not same_kind:
                    wrong.append(f"{section.path}.{key}: documented {cell}, code {default!r}")
            elif default is not None:
                wrong.append(f"{section.path}.{key}: documented {cell!r}, code {default!r}")
    assert wrong == []


def test_every_tagged_table_documents_its_tag_as_required() -> None:
    text = CONFIGURATION.read_text(encoding="utf-8")
    for section in all_sections():
        tag_field = section.struct.__struct_config__.tag_field
        if tag_field is None:
            continue
        rows = documented_rows(section, text)
        assert rows is not None and tag_field in rows, section.tag
        assert rows[tag_field][2] == "required", section.tag


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_in_the_docs_exists(page: Path) -> None:
    named = set(REPO_PATH.findall(page.read_text(encoding="utf-8")))
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert missing == [], f"{page.name} names paths that do not exist: {missing}"


def anchors(page: Path) -> set[str]:
    """The fragment names a page offers: GitHub's slugs of its headings, and <a id>."""
    text = page.read_text(encoding="utf-8")
    found = set(ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for heading, _ in split_sections(text)[1:]:
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path) -> Iterator[str]:
    for fenced, line in prose_lines(page.read_text(encoding="utf-8")):
        if not fenced:
            yield from LINK.findall(re.sub(r"`[^`]*`", "", line))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_in_the_docs_points_at_a_file(page: Path) -> None:
    broken = []
    for link in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):
            continue  # https:, mailto:: not ours to check
        target, _, fragment = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if path in LATER and not path.exists():
            continue
        if not path.exists() or (
                fragment and path.suffix == ".md" and fragment not in anchors(path)):
            broken.append(link)
    assert broken == [], f"{page.name} has broken links: {broken}"


def test_the_example_config_shows_every_key() -> None:
    """config/example.toml says it shows every option: each key, set or commented out."""
    example = (ROOT / "config" / "example.toml").read_text(encoding="utf-8")
    missing = sorted({f"{section.path}.{key}" for section in all_sections()
                      for key in section.keys
                      if not re.search(rf"(^|[\s{{,#]){re.escape(key)}\s*=", example, re.M)})
    assert not missing, f"config/example.toml lacks {missing}"
