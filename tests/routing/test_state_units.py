"""The route state file without a sidecar: saved weight changes read back and applied, a damaged
or outdated file ignored with the config's weights standing, and every write atomic."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest

from sidecar.routing.state import RouteState
from sidecar.routing.table import Route, RouteTable, Target

A = Target("p", "a", 3)
B = Target("q", "b", 1)


def table() -> RouteTable:
    return RouteTable({"m": Route("m", [A, B])}, ["p", "q"])


def test_a_missing_file_means_no_saved_changes(tmp_path: Path) -> None:
    assert RouteState(str(tmp_path / "none.json")).read() == {}


@pytest.mark.parametrize(("raw", "words"), [(b"{not json", "not JSON"),
                                            (b"[1, 2]", "not a JSON object")])
def test_a_damaged_file_is_ignored_and_logged(tmp_path: Path, raw: bytes, words: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "routes.json"
    path.write_bytes(raw)
    with caplog.at_level(logging.ERROR, logger="sidecar.routing"):
        assert RouteState(str(path)).read() == {}
    (record,) = caplog.records
    assert record.getMessage() == f"route state file is {words}; ignoring it"
    assert record.__dict__["fields"] == {"path": str(path)}


def test_changes_written_are_read_back_and_applied(tmp_path: Path) -> None:
    path = tmp_path / "state" / "routes.json"
    state = RouteState(str(path))
    routes = table()
    state.apply(routes, {"m": [{"provider": "q", "weight": 7}]})
    assert state.changed["m"][1]["weight"] == 7.0
    state.write()
    assert not path.with_suffix(".tmp").exists()
    again = RouteState(str(path))
    saved = again.read()
    assert saved == orjson.loads(path.read_bytes()) == state.changed
    fresh = table()
    again.apply(fresh, saved)
    route = fresh.get("m")
    assert route is not None and [t.weight for t in route.targets] == [3, 7.0]
    assert again.changed == state.changed


def test_an_entry_that_no_longer_fits_the_config_is_skipped_and_the_rest_applies(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = RouteState(str(tmp_path / "routes.json"))
    routes = table()
    with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
        state.apply(routes, {"gone": [{"provider": "p", "weight": 1}],
                             "m": [{"provider": "p", "weight": 0}]})
    assert list(state.changed) == ["m"]
    assert routes.to_json()["m"][0]["weight"] == 0.0
    warned = [r for r in caplog.records
              if r.getMessage() == "saved routes do not fit the config; ignored"]
    assert len(warned) == 1
    fields = warned[0].__dict__["fields"]
    assert fields["model"] == "gone" and "no model `gone`" in fields["reason"]


def test_a_long_model_name_is_logged_cut_short_with_the_files_path(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "routes.json"
    state = RouteState(str(path))
    with caplog.at_level(logging.WARNING, logger="sidecar.routing"):
        state.apply(table(), {"x" * 150: [{"provider": "p", "weight": 1}]})
    (record,) = caplog.records
    assert record.__dict__["fields"] == {
        "model": "x" * 100, "path": str(path),
        "reason": f"There is no model `{'x' * 150}` to change."}


def test_a_write_makes_the_missing_folders_and_indents_the_file_for_a_person(
        tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "routes.json"
    state = RouteState(str(path))
    state.changed = {"m": [{"provider": "p", "weight": 1.0}]}
    state.write()
    assert path.read_text().splitlines() == [
        "{", '  "m": [', "    {", '      "provider": "p",', '      "weight": 1.0', "    }",
        "  ]", "}"]


def test_a_write_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_bytes(b'{"old": [], "padding": "' + b"x" * 1000 + b'"}')
    state = RouteState(str(path))
    state.changed = {"m": [{"provider": "p", "model": "a", "weight": 1.0,
                            "fallback_only": False}]}
    state.write()
    assert orjson.loads(path.read_bytes()) == state.changed
