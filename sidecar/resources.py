"""Where the files that ship with the package are found: `web/` (the admin page's templates
and static files), `config/` (the default and example configs) and `systemd/` (the unit).

In a checkout (an editable install included) they sit beside the package. A wheel carries
copies inside the package, in `sidecar/_data/`, put there by the build step of setup.py; they
are looked for there first, since beside an installed package is site-packages, where a folder
of that name would be another project's."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The folder `name` ("web", "config" or "systemd") of this installation (it may not
    exist: `web/` is optional). Touches the file system: call it at start or in a thread."""
    inside = PACKAGE_DIR / "_data" / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name
