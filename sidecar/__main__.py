"""`python -m sidecar`: the same command line as `sidecar`."""

from sidecar.cli import main

raise SystemExit(main())
