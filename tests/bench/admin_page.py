"""The admin page's cost to proxied traffic: the p99 latency of proxied chat requests under
wrk, with and without a browser viewing the page during the load, side by side in one run
(alternating rounds), and their ratio. The goal: page views move the p99 by less than 5%.

The sidecar (auth off, so the page is open on loopback) is pinned to CPU 0; the fast mock
upstream, wrk and the page viewer share CPU 1. Every target is loopback. Run with
`python -m tests.bench.admin_page` (it needs `wrk`)."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
from pathlib import Path

import httpx
import orjson

from tests.bench.gateway import (
    CHAT,
    LOAD_CPU,
    ONE_TARGET,
    PY,
    SERVER_CPU,
    SIDECAR_CONFIG,
    free_port,
    process,
    wrk,
)

# What a viewer reads per view: the pages an operator flips between.
PAGES = ("/admin/", "/admin/routing", "/admin/cache", "/admin/audit")


class Viewer(threading.Thread):
    """A browser with the page open: every `interval_s`, each page once, with its cookie."""

    def __init__(self, url: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.views = 0
        self.failures = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                for path in PAGES:
                    answer = client.get(path)
                    if answer.status_code == 200:
                        self.views += 1
                    else:
                        self.failures += 1
                self.stop.wait(self.interval_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5, help="length of one wrk round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--view-interval", type=float, default=1.0,
                        help="seconds between page views (the page's script refreshes every 5)")
    args = parser.parse_args()
    # The viewer shares the load's CPU, as a browser on another machine would not touch the
    # server's.
    os.sched_setaffinity(0, {int(LOAD_CPU)})
    work = Path(tempfile.mkdtemp(prefix="sidecar-admin-bench-"))
    script = work / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = [[{orjson.dumps(CHAT).decode()}]]\n")
    mock_port, port = free_port(), free_port()
    config = work / "sidecar.toml"
    config.write_text(SIDECAR_CONFIG.format(port=port, mock=mock_port, targets=ONE_TARGET)
                      .replace('requests = true', 'requests = false'))
    env = {"BENCH_UPSTREAM_KEY": "sk-bench-not-a-real-key"}
    url = f"http://127.0.0.1:{port}"
    with process([PY, "-m", "tests.bench.mock", str(mock_port)], LOAD_CPU, mock_port), \
            process([PY, "-m", "sidecar", "serve", "--config", str(config)], SERVER_CPU, port,
                    work / "sidecar.log", env):
        chat = url + "/v1/chat/completions"
        wrk(chat, 8, 1, script)  # warm up connections and code paths
        runs: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
        views = failures = 0
        for _ in range(args.rounds):
            runs["without"].append(wrk(chat, args.connections, args.seconds, script))
            viewer = Viewer(url, args.view_interval)
            viewer.start()
            runs["with"].append(wrk(chat, args.connections, args.seconds, script))
            viewer.stop.set()
            viewer.join()
            views += viewer.views
            failures += viewer.failures
    if failures:
        print(f"{failures} page views failed")
        return 1
    p99 = {kind: statistics.median(r["p99"] for r in rounds) for kind, rounds in runs.items()}
    p50 = {kind: statistics.median(r["p50"] for r in rounds) for kind, rounds in runs.items()}
    rps = {kind: statistics.median(r["rps"] for r in rounds) for kind, rounds in runs.items()}
    print(f"{args.rounds} rounds of {args.seconds:g} s each way, {args.connections} connections;"
          f" {views} page views ({len(PAGES)} pages every {args.view_interval:g} s)")
    print(f"{'':28} {'without views':>14} {'with views':>12} {'ratio':>7}")
    for label, values in (("proxied p99 (ms)", p99), ("proxied p50 (ms)", p50),
                          ("proxied requests/s", rps)):
        print(f"{label:28} {values['without']:14.2f} {values['with']:12.2f} "
              f"{values['with'] / values['without']:7.3f}")
    print("per round p99 without:", " ".join(f"{r['p99']:.2f}" for r in runs["without"]))
    print("per round p99 with:   ", " ".join(f"{r['p99']:.2f}" for r in runs["with"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
