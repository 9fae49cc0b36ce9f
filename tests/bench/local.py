"""The local engine benchmark: the embedded CPU model through the sidecar against the same
engine's own generation loop, and proxied requests while the local model generates.

Run with `python -m tests.bench.local` (after `make test` or `make serve` has installed).
Everything is loopback; the mock upstream is tests/bench/mock.py.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import orjson

from sidecar.engines.job import Params
from sidecar.engines.transformers import TransformersEngine
from tests.bench.gateway import LOAD_CPU, PY, ROOT, free_port, pct, process

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
CONFIG = """
[server]
host = "127.0.0.1"
port = {port}

[logging]
requests = false

[providers.local]
kind = "local"
engine = "transformers"
max_seq_len = 2048
max_batch_size = 8
dtype = "{dtype}"

[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:{mock}/v1"

[models."local"]
targets = [ {{ provider = "local" }} ]

[models."bench"]
targets = [ {{ provider = "mock", model = "bench-upstream" }} ]

[routing]
probe_interval_s = 0
state_file = "{state}"
"""
CHAT = orjson.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]})


def through_sidecar(url: str, tokens: int) -> tuple[float, int]:
    """Seconds from sending the request to the last token, and the tokens received."""
    body = {"model": "local", "messages": PROMPT, "temperature": 0, "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    last, count = started, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
    return last - started, count


def raw_loop(engine: TransformersEngine, tokens: int) -> tuple[float, int]:
    ids = engine.encode_prompt(engine.render_chat(PROMPT))
    started = time.perf_counter()
    _, count = engine.generate_direct(ids, Params(max_tokens=tokens, temperature=0))
    return time.perf_counter() - started, count


async def latencies(urls: list[str], count: int) -> list[list[float]]:
    """Milliseconds per request for each URL, the URLs taking turns request by request, so
    that every one sees the same moments of a noisy machine."""
    out: list[list[float]] = [[] for _ in urls]
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            for i, url in enumerate(urls):
                started = time.perf_counter()
                async with session.post(url, data=CHAT,
                                        headers={"Content-Type": "application/json"}) as reply:
                    await reply.read()
                    assert reply.status == 200, reply.status
                out[i].append((time.perf_counter() - started) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--latency-rounds", type=int, default=6)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--keep-generating", nargs=2, metavar=("URL", "FLAG"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.keep_generating:  # the helper process: short local streams while FLAG exists
        url, flag = args.keep_generating[0], Path(args.keep_generating[1])
        while True:
            if flag.exists():
                through_sidecar(url, 16)
            else:
                time.sleep(0.01)

    engine = TransformersEngine(dtype=args.dtype, max_batch_size=1, max_queue=1,
                                max_seq_len=2048, stall_s=60,
                                load_wait_s=60)

    async def load() -> None:
        await engine.load("builtin:smollm2-135m-instruct")

    asyncio.run(load())
    work = Path(tempfile.mkdtemp(prefix="bench-local-"))
    mock_port, port = free_port(), free_port()
    config = work / "sidecar.toml"
    config.write_text(CONFIG.format(port=port, mock=mock_port, state=work / "routes.json",
                                    dtype=args.dtype))
    with process([PY, "-m", "tests.bench.mock", str(mock_port)], LOAD_CPU, mock_port), \
            process([PY, "-m", "sidecar", "serve", "--config", str(config)], "0-1", port,
                    log=work / "sidecar.log"):
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(url + "/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the local model did not load")
            time.sleep(0.2)
        through_sidecar(url, 8)  # warm both up
        raw_loop(engine, 8)
        raw_rates, side_rates = [], []
        for _ in range(args.rounds):
            seconds, count = raw_loop(engine, args.tokens)
            raw_rates.append(count / seconds)
            seconds, count = through_sidecar(url, args.tokens)
            side_rates.append(count / seconds)
        asyncio.run(engine.close())
        # Concurrent streams share each forward pass: aggregate tokens/s of 4 and 8 at once.
        aggregate = {}
        for streams in (4, 8):
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(streams) as pool:
                counts = list(pool.map(lambda _: through_sidecar(url, args.tokens)[1],
                                       range(streams)))
            aggregate[streams] = sum(counts) / (time.perf_counter() - started)

        direct = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
        proxied = f"{url}/v1/chat/completions"
        # Rounds alternate idle and busy, each against that round's direct call; the local
        # streams are read by another process, so this one's GIL measures only the sidecar.
        flag = work / "generate"
        added: dict[str, list[list[float]]] = {"idle": [], "busy": []}
        with subprocess.Popen([PY, "-m", "tests.bench.local", "--keep-generating", url,
                               str(flag)], cwd=ROOT) as helper:
            for _ in range(args.latency_rounds):
                for phase in ("idle", "busy"):
                    if phase == "busy":
                        flag.touch()
                        time.sleep(0.5)
                    base, values = asyncio.run(latencies([direct, proxied], args.requests))
                    if phase == "busy":
                        active = httpx.get(url + "/admin/api/engines").json()["engines"]
                        assert active["local"]["active_jobs"] == 1, active
                        flag.unlink()
                        time.sleep(1.5)  # the last local request ends
                    added[phase].append([pct(values, q) - pct(base, q) for q in (0.5, 0.99)])
            helper.terminate()

    raw_rate, side_rate = statistics.median(raw_rates), statistics.median(side_rates)
    median = {phase: [statistics.median(r[i] for r in rounds) for i in (0, 1)]
              for phase, rounds in added.items()}
    rows = [
        ("measure", "reference", "llm-sidecar", "ratio", "goal"),
        (f"CPU engine tokens/s, one stream ({args.tokens} tokens, greedy)",
         f"{raw_rate:.1f} raw loop", f"{side_rate:.1f}", f"{side_rate / raw_rate:.2f}",
         ">= 0.95"),
        ("CPU engine aggregate tokens/s, 4 concurrent streams vs 1 (through the sidecar)",
         f"{side_rate:.1f}", f"{aggregate[4]:.1f}", f"{aggregate[4] / side_rate:.2f}", ""),
        ("CPU engine aggregate tokens/s, 8 concurrent streams vs 1 (through the sidecar)",
         f"{side_rate:.1f}", f"{aggregate[8]:.1f}", f"{aggregate[8] / side_rate:.2f}", ""),
        # Medians over rounds first, then the ratio: a round's added p99 can be negative
        # (its direct calls had the worse tail), which makes per-round ratios meaningless.
        ("proxied request added latency p50, ms (idle -> local model generating)",
         f"{median['idle'][0]:.3f}", f"{median['busy'][0]:.3f}",
         f"{median['busy'][0] / median['idle'][0]:.2f}", ""),
        ("proxied request added latency p99, ms (idle -> local model generating)",
         f"{median['idle'][1]:.3f}", f"{median['busy'][1]:.3f}",
         f"{median['busy'][1] / median['idle'][1]:.2f}", "<= 1.5"),
    ]
    print(f"tokens/s rounds: raw {[round(r, 1) for r in raw_rates]}, "
          f"sidecar {[round(r, 1) for r in side_rates]}; added p99 per round, idle "
          f"{[round(r[1], 3) for r in added['idle']]}, busy "
          f"{[round(r[1], 3) for r in added['busy']]}")
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return 0


if __name__ == "__main__":
    sys.exit(main())
