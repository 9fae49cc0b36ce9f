"""Instructions per proxied request, counted by valgrind's callgrind: the same number for the
same code and input whatever else the machine is doing, where requests per second on a shared
machine move by 15% between two runs of the same code.

Each sidecar (this tree, or a git revision checked out in a temporary worktree) runs under
callgrind against the benchmark mock: after 50 requests to warm it up, its counters are zeroed
(`callgrind_control --zero`), it serves N non-streamed chat requests one after the other, and
its counters are dumped; the total over N is the cost of one request, with no start-up or
first-call cost in it (two runs of one tree agree within 0.3%). It needs valgrind (Debian
package `valgrind`) and takes about half a minute a tree.

    python -m tests.bench.instructions 7051ac3 HEAD
    python -m tests.bench.instructions --extra '[metrics]\\nenabled = false' .
    python -m tests.bench.instructions floor .     # the bare aiohttp proxy beside this tree
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import orjson

from tests.bench.gateway import (
    CHAT,
    LOAD_CPU,
    ONE_TARGET,
    PY,
    ROOT,
    SIDECAR_CONFIG,
    free_port,
    process,
    wait_port,
)

# Requests before counting: pools opened, code paths specialized, first-call imports done.
WARM_UP = 50

def instructions(tree: Path | None, requests: int, mock: int, extra: str,
                 concurrency: int = 1) -> float:
    """Instructions per request of one server; `tree` None: the bare aiohttp proxy (the
    floor). Counted between a zeroing and a dump of callgrind's counters around the N
    requests, after a warm-up, so that neither start-up nor first-call costs are in it."""
    work = Path(tempfile.mkdtemp(prefix="sidecar-callgrind-"))
    port = free_port()
    config = work / "sidecar.toml"
    config.write_text(SIDECAR_CONFIG.format(port=port, mock=mock, targets=ONE_TARGET) + extra)
    env = {**os.environ, "BENCH_UPSTREAM_KEY": "sk-bench-not-a-real-key"}
    served = (["sidecar", "serve", "--config", str(config)] if tree is not None else
              ["tests.bench.floor", f"http://127.0.0.1:{mock}/v1", str(port)])
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with (work / "valgrind.log").open("wb") as log:
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work / 'out'}", PY, "-m",
             *served],
            cwd=tree or ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_port(port, 300)
            asyncio.run(_send(url, WARM_UP))
            subprocess.run(["callgrind_control", "--zero", str(server.pid)], check=True,
                           capture_output=True)
            asyncio.run(_send(url, requests, concurrency))
            subprocess.run(["callgrind_control", "--dump", str(server.pid)], check=True,
                           capture_output=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(300)
    dumps = sorted(work.glob("out.*"))
    counted = re.search(r"^(?:summary|totals): (\d+)", dumps[0].read_text() if dumps else "",
                        re.M)
    if counted is None:
        raise RuntimeError(f"callgrind dumped no total in {work}")
    return int(counted[1]) / requests


async def _send(url: str, requests: int, concurrency: int = 1) -> None:
    """`requests` chat requests, `concurrency` at a time (each on a connection of its own)."""
    body = orjson.dumps(CHAT)
    left = iter(range(requests))

    async def one_by_one(session: aiohttp.ClientSession) -> None:
        for _ in left:
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"{reply.status}: {await reply.text()}")
                await reply.read()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one_by_one(session) for _ in range(concurrency)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", metavar="REV",
                        help="git revisions, `.` for this working tree, or `floor` for the "
                        "bare aiohttp proxy of tests/bench/floor.py")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--extra", default="", help="TOML appended to every sidecar's config")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight at once (1: one after the other)")
    args = parser.parse_args()
    extra = "\n" + args.extra.replace("\\n", "\n") + "\n" if args.extra else ""
    temporary: list[Path] = []
    rows: list[tuple[str, float]] = []
    mock = free_port()
    try:
        with process([PY, "-m", "tests.bench.mock", str(mock)], LOAD_CPU, mock):
            for rev in args.trees:
                tree: Path | None = ROOT
                if rev == "floor":
                    tree = None
                elif rev != ".":
                    tree = Path(tempfile.mkdtemp(prefix="sidecar-rev-"))
                    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev],
                                   cwd=ROOT, check=True, capture_output=True)
                    temporary.append(tree)
                rows.append((rev, instructions(tree, args.requests, mock, extra,
                                               args.concurrency)))
    finally:
        for tree in temporary:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           check=False, capture_output=True)
    first = rows[0][1]
    print(f"\ninstructions per non-streamed chat request ({args.requests} requests, "
          f"{args.concurrency} at a time)\n")
    print("| tree | instructions | first / this |")
    print("|---|---|---|")
    for rev, count in rows:
        print(f"| {rev} | {count:,.0f} | {first / count:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
