"""The gateway benchmark: the sidecar against a bare aiohttp proxy, measured in one run.

Both servers are pinned to CPU 0; the mock upstream, wrk and the streaming client share CPU 1.
Every target is loopback. Run with `make bench` (or `python -m tests.bench.gateway`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from sidecar.security.certs import generate_issuer

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
SERVER_CPU = "0"
LOAD_CPU = "1" if (os.cpu_count() or 1) > 1 else "0"
CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Say hello in five words."}],
        "temperature": 0.7}

SIDECAR_CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
heartbeat_s = 15

[logging]
level = "info"
requests = true

[limits]
max_concurrent_requests = 4096   # the default, 512, would answer the 1,000-stream row with 503s

[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:{mock}/v1"
api_key_env = "BENCH_UPSTREAM_KEY"

[models."bench"]
targets = {targets}
"""
ONE_TARGET = '[ { provider = "mock", model = "bench-upstream", weight = 1 } ]'
# The same mock as an Anthropic upstream: Anthropic clients' requests pass through to it.
CLAUDE_TARGET = '[ { provider = "claude", model = "bench-upstream", weight = 1 } ]'
CLAUDE = """
[providers.claude]
kind = "anthropic"
base_url = "http://127.0.0.1:{mock}"
api_key_env = "BENCH_UPSTREAM_KEY"
"""
MESSAGES = {"model": "bench", "max_tokens": 64, "temperature": 0.7,
            "messages": [{"role": "user", "content": "Say hello in five words."}]}
JWT_AUTH = """
[auth]
mode = "jwt"
algorithms = ["RS256"]
public_key_file = "{public}"
issuer = "https://idp.bench/"
audience = "llm-sidecar"
"""
THREE_TARGETS = ('[ { provider = "mock", model = "bench-upstream", weight = 3 }, '
                 '{ provider = "mock", model = "bench-upstream", weight = 1 }, '
                 '{ provider = "mock", model = "bench-upstream", weight = 1 } ]')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def process(args: Sequence[str], cpu: str, port: int, log: Path | None = None,
            env: dict[str, str] | None = None, cwd: Path = ROOT
            ) -> Iterator[subprocess.Popen[bytes]]:
    out = log.open("wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(["taskset", "-c", cpu, *args], cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        wait_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()  # type: ignore[union-attr]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, connections: int, seconds: float, script: Path,
        pid: int | None = None) -> dict[str, float]:
    cpu_before = cpu_seconds(pid) if pid else 0.0
    result = subprocess.run(
        ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
         "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True)
    text = result.stdout
    if "Non-2xx" in text or "Socket errors" in text:
        raise RuntimeError(f"wrk saw errors against {url}:\n{text}")
    stats = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text)[1])}  # type: ignore[index]
    count = int(re.search(r"(\d+) requests in", text)[1])  # type: ignore[index]
    if pid:
        stats["cpu_us"] = (cpu_seconds(pid) - cpu_before) * 1e6 / count
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        stats[f"p{pct}"] = float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    return stats


async def stream_timings(url: str, requests: int, chunks: int, delay_ms: float,
                         ask: dict[str, Any] = CHAT) -> tuple[list[float], list[float]]:
    """Per-chunk delay from leaving the mock to reaching this client, and time to first byte.
    The stamp is read from `sent_ns`, or from the text (`@` and the time), which survives a
    translation into another protocol."""
    knob = {"bench": {"chunks": chunks, "delay_ms": delay_ms}}
    if ask is MESSAGES:  # translated, the body keeps only what the protocol says: the text
        body = orjson.dumps({**ask, "stream": True, "messages": [
            {"role": "user", "content": orjson.dumps(knob).decode()}]})
    else:
        body = orjson.dumps({**ask, "stream": True, **knob})
    lags: list[float] = []
    ttfb: list[float] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(requests):
            started = time.monotonic_ns()
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                assert response.status == 200, await response.text()
                buffer = b""
                first = True
                async for chunk in response.content.iter_any():
                    now = time.monotonic_ns()
                    if first:
                        ttfb.append((now - started) / 1e6)
                        first = False
                    buffer += chunk
                    *events, buffer = buffer.split(b"\n\n")
                    for event in events:
                        stamp = re.search(rb'(?:"sent_ns":|@)(\d+)', event)
                        if stamp:
                            lags.append((now - int(stamp[1])) / 1e6)
    return lags, ttfb


async def scraped_while(streams: Coroutine[Any, Any, tuple[list[float], list[float]]],
                        metrics_url: str) -> list[float]:
    """The chunk delays of `streams`, measured while a scraper reads `metrics_url` every
    100 ms, as Prometheus would (far more often than it does)."""
    done = asyncio.Event()

    async def scrape() -> None:
        async with aiohttp.ClientSession() as session:
            while not done.is_set():
                async with session.get(metrics_url) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                await asyncio.sleep(0.1)

    scraper = asyncio.create_task(scrape())
    try:
        lags, _ = await streams
    finally:
        done.set()
        await scraper
    return lags


async def first_byte_times(urls: list[str], rounds: int, per_round: int) -> list[list[float]]:
    """Time to the first body byte of short streams, alternating between the urls."""
    body = orjson.dumps({**CHAT, "stream": True, "bench": {"chunks": 2, "delay_ms": 0}})
    times: list[list[float]] = [[] for _ in urls]
    async with aiohttp.ClientSession() as session:
        for round_ in range(rounds + 1):
            for i, url in enumerate(urls):
                for _ in range(per_round):
                    started = time.monotonic_ns()
                    async with session.post(url, data=body, headers={
                            "Content-Type": "application/json"}) as response:
                        await response.content.readany()
                        if round_:  # the first round warms connections up
                            times[i].append((time.monotonic_ns() - started) / 1e6)
                        await response.read()
    return times


async def hold_streams(url: str, count: int, chunks: int, delay_ms: float) -> int:
    body = orjson.dumps({**CHAT, "stream": True,
                         "bench": {"chunks": chunks, "delay_ms": delay_ms}})
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one() -> bool:
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                raw = await response.read()
                return response.status == 200 and raw.endswith(b"data: [DONE]\n\n")

        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    return sum(1 for r in results if r is True)


async def stream_frames(url: str, streams: int, chunks: int, delay_ms: float) -> int:
    """`streams` concurrent streams of `chunks` events each: the events received."""
    body = orjson.dumps({**CHAT, "stream": True,
                         "bench": {"chunks": chunks, "delay_ms": delay_ms}})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> int:
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                raw = await response.read()
                assert response.status == 200 and raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
                return raw.count(b"\n\n")

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


def cpu_per_frame(url: str, pid: int, streams: int, chunks: int, delay_ms: float) -> float:
    """The server's CPU time per stream event it passed on, in microseconds."""
    before = cpu_seconds(pid)
    frames = asyncio.run(stream_frames(url, streams, chunks, delay_ms))
    return (cpu_seconds(pid) - before) * 1e6 / frames


def peak_rss_mb(pid: int) -> float:
    # The server runs under taskset, which execs it: same pid.
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2, help="each throughput run")
    parser.add_argument("--rounds", type=int, default=9, help="alternating runs per target")
    parser.add_argument("--latency-rounds", type=int, default=15,
                        help="alternating c=1 runs per target (p99 is the noisiest figure)")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--messages-only", action="store_true",
                        help="only the rows of the Anthropic front door")
    parser.add_argument("--stream-rounds", type=int, default=5,
                        help="alternating runs of the CPU-per-frame rows")
    parser.add_argument("--ab", metavar="REV",
                        help="instead: this tree's sidecar against the one at git revision REV "
                        "(e.g. main), side by side, throughput and added latency")
    parser.add_argument("--extra-a", default="", metavar="TOML",
                        help="with --ab: appended to A's config, e.g. "
                        "'[metrics]\\nenabled = false'")
    parser.add_argument("--extra-b", default="", metavar="TOML",
                        help="with --ab: appended to B's config")
    args = parser.parse_args()
    if args.ab:
        return ab(args.ab, args.rounds, args.latency_rounds, args.seconds,
                  (args.extra_a, args.extra_b))

    work = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    script = work / "post.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{orjson.dumps(CHAT).decode()}]]\n")
    private, public, _ = generate_issuer(work / "issuer")
    now = int(time.time())
    token = jwt.encode({"iss": "https://idp.bench/", "aud": "llm-sidecar", "sub": "bench",
                        "iat": now, "exp": now + 3600, "scope": "sidecar:chat"},
                       private.read_bytes(), algorithm="RS256")
    cache_script = work / "post-cached.lua"
    cache_script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{orjson.dumps({**CHAT, 'temperature': 0}).decode()}]]\n")
    messages_script = work / "post-messages.lua"
    messages_script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{orjson.dumps(MESSAGES).decode()}]]\n")
    jwt_script = work / "post-jwt.lua"
    jwt_script.write_text(script.read_text()
                          + f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    mock_port, floor_port, one_port, three_port, jwt_port, cache_port, quiet_port, \
        claude_port = (free_port() for _ in range(8))
    env = {"BENCH_UPSTREAM_KEY": "sk-bench-not-a-real-key", "PYTHONUNBUFFERED": "1"}
    configs = {}
    for name, port, targets, auth in (
            ("one", one_port, ONE_TARGET, ""), ("three", three_port, THREE_TARGETS, ""),
            ("jwt", jwt_port, ONE_TARGET, JWT_AUTH.format(public=public)),
            ("cache", cache_port, ONE_TARGET, "\n[cache]\nenabled = true\n"),
            ("quiet", quiet_port, ONE_TARGET, "\n[metrics]\nenabled = false\n"),
            ("claude", claude_port, CLAUDE_TARGET, CLAUDE.format(mock=mock_port))):
        path = work / f"{name}.toml"
        path.write_text(SIDECAR_CONFIG.format(port=port, mock=mock_port, targets=targets) + auth)
        configs[name] = path

    rows: list[tuple[str, str, str, str, str, str]] = []
    with process([PY, "-m", "tests.bench.mock", str(mock_port)], LOAD_CPU, mock_port), \
         process([PY, "-m", "tests.bench.floor", f"http://127.0.0.1:{mock_port}/v1",
                  str(floor_port)], SERVER_CPU, floor_port) as floor, \
         process([PY, "-m", "sidecar", "serve", "--config", str(configs["one"])], SERVER_CPU,
                 one_port, work / "sidecar.log", env) as sidecar, \
         process([PY, "-m", "sidecar", "serve", "--config", str(configs["three"])], SERVER_CPU,
                 three_port, work / "sidecar3.log", env) as sidecar3, \
         process([PY, "-m", "sidecar", "serve", "--config", str(configs["jwt"])], SERVER_CPU,
                 jwt_port, work / "sidecar-jwt.log", env) as sidecar_jwt, \
         process([PY, "-m", "sidecar", "serve", "--config", str(configs["cache"])], SERVER_CPU,
                 cache_port, work / "sidecar-cache.log", env) as sidecar_cache, \
         process([PY, "-m", "sidecar", "serve", "--config", str(configs["quiet"])], SERVER_CPU,
                 quiet_port, work / "sidecar-quiet.log", env) as sidecar_quiet, \
         process([PY, "-m", "sidecar", "serve", "--config", str(configs["claude"])],
                 SERVER_CPU, claude_port, work / "sidecar-claude.log", env) as sidecar_claude:
        direct = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
        urls = {"floor": f"http://127.0.0.1:{floor_port}/v1/chat/completions",
                "sidecar": f"http://127.0.0.1:{one_port}/v1/chat/completions",
                "sidecar3": f"http://127.0.0.1:{three_port}/v1/chat/completions",
                "sidecar_jwt": f"http://127.0.0.1:{jwt_port}/v1/chat/completions",
                "sidecar_cache": f"http://127.0.0.1:{cache_port}/v1/chat/completions",
                "sidecar_quiet": f"http://127.0.0.1:{quiet_port}/v1/chat/completions"}
        urls["sidecar_claude"] = f"http://127.0.0.1:{claude_port}/v1/messages"
        if args.messages_only:
            urls = {name: urls[name] for name in ("sidecar", "sidecar_claude")}
        scripts = {name: script for name in urls}
        scripts["sidecar_claude"] = messages_script
        scripts["sidecar_jwt"] = jwt_script
        scripts["sidecar_cache"] = cache_script  # temperature 0: every request after the first hits
        for name, url in urls.items():  # warm up pools and code paths
            wrk(url, 8, 1, scripts[name])

        # This machine is shared and noisy: short runs, alternated, compared pair by pair.
        pids = {"floor": floor.pid, "sidecar": sidecar.pid, "sidecar3": sidecar3.pid,
                "sidecar_jwt": sidecar_jwt.pid, "sidecar_cache": sidecar_cache.pid,
                "sidecar_quiet": sidecar_quiet.pid, "sidecar_claude": sidecar_claude.pid}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        runs["direct"] = []
        for _ in range(args.rounds):
            runs["direct"].append(wrk(direct, 32, args.seconds, script))
            for name, url in urls.items():
                runs[name].append(wrk(url, 32, args.seconds, scripts[name], pids[name]))

        def compare(label: str, base: str, other: str, goal: str) -> None:
            rps = statistics.median(a["rps"] / b["rps"] for a, b in zip(runs[other], runs[base],
                                                                         strict=True))
            cpu = statistics.median(b["cpu_us"] / a["cpu_us"] for a, b in zip(runs[other],
                                                                               runs[base],
                                                                               strict=True))
            base_rps, other_rps = (statistics.median(r["rps"] for r in runs[n])
                                   for n in (base, other))
            base_cpu, other_cpu = (statistics.median(r["cpu_us"] for r in runs[n])
                                   for n in (base, other))
            direct_rps = (f"{statistics.median(r['rps'] for r in runs['direct']):,.0f}"
                          if base == "floor" else "")
            rows.append((label, direct_rps, f"{base_rps:,.0f}", f"{other_rps:,.0f}",
                         f"{rps:.2f}", goal))
            rows.append(("  the same as requests per CPU-second (1e6 / CPU-us per request)", "",
                         f"{1e6 / base_cpu:,.0f}", f"{1e6 / other_cpu:,.0f}", f"{cpu:.2f}",
                         goal))

        compare("Anthropic in -> Anthropic out vs OpenAI in -> OpenAI out, passed through",
                "sidecar", "sidecar_claude", ">= 0.95")
        one_messages = f"http://127.0.0.1:{one_port}/v1/messages"
        plain_lags, _ = asyncio.run(stream_timings(urls["sidecar"], 10, 64, 20))
        crossed_lags, _ = asyncio.run(stream_timings(one_messages, 10, 64, 20, MESSAGES))
        rows.append(("stream translated (Anthropic in, OpenAI out), p99 ms per chunk", "",
                     f"{pct(plain_lags, 0.99):.3f} passed through",
                     f"{pct(crossed_lags, 0.99):.3f}",
                     f"+{pct(crossed_lags, 0.99) - pct(plain_lags, 0.99):.3f} ms", "<= 0.3 ms"))
        if args.messages_only:
            _print(rows)
            return 0
        compare("non-streamed chat, req/s (c=32, server pinned to 1 core)", "floor", "sidecar",
                ">= 2.50")
        compare("3 weighted targets vs 1 target (both llm-sidecar)", "sidecar", "sidecar3",
                ">= 0.95")
        compare("JWT (RS256) on vs auth off (both llm-sidecar)", "sidecar", "sidecar_jwt",
                ">= 0.90")
        compare("cache hits vs uncached proxying (both llm-sidecar)", "sidecar", "sidecar_cache",
                ">= 1.50")
        compare("metrics on vs off (both llm-sidecar)", "sidecar_quiet", "sidecar", ">= 0.97")

        lat: dict[str, list[dict[str, float]]] = {"direct": [], "floor": [], "sidecar": [],
                                                  "cache": []}
        for _ in range(args.latency_rounds):
            lat["direct"].append(wrk(direct, 1, args.seconds, script))
            lat["floor"].append(wrk(urls["floor"], 1, args.seconds, script))
            lat["sidecar"].append(wrk(urls["sidecar"], 1, args.seconds, script))
            lat["cache"].append(wrk(urls["sidecar_cache"], 1, args.seconds, cache_script))
        for q in ("p50", "p99"):
            # Each round's added latency over that round's direct call, then the median.
            floor_add = [f[q] - d[q] for f, d in zip(lat["floor"], lat["direct"], strict=True)]
            side_add = [s[q] - d[q] for s, d in zip(lat["sidecar"], lat["direct"], strict=True)]
            ratio = statistics.median(s / f for s, f in zip(side_add, floor_add, strict=True))
            base = statistics.median(r[q] for r in lat["direct"])
            rows.append((f"added latency {q}, ms (c=1)", f"{base:.3f} (whole)",
                         f"{statistics.median(floor_add):.3f}",
                         f"{statistics.median(side_add):.3f}", f"{ratio:.2f}",
                         "<= 0.70" if q == "p50" else ""))
        hit_add = statistics.median(c["p50"] - d["p50"] for c, d in zip(
            lat["cache"], lat["direct"], strict=True))
        rows.append(("cache hit p50 above a direct call to the mock, ms (c=1)", "", "",
                     f"{hit_add:.3f}", "", "<= 0.6 ms"))

        direct_lags, _ = asyncio.run(stream_timings(direct, 10, 64, 20))
        floor_lags, _ = asyncio.run(stream_timings(urls["floor"], 10, 64, 20))
        side_lags, _ = asyncio.run(stream_timings(urls["sidecar"], 10, 64, 20))
        direct_ttfb, side_ttfb = asyncio.run(first_byte_times([direct, urls["sidecar"]], 5, 40))
        rows.append(("stream: chunk leaves mock -> reaches client, p99 ms (64 x 20 ms)",
                     f"{pct(direct_lags, 0.99):.3f}", f"{pct(floor_lags, 0.99):.3f}",
                     f"{pct(side_lags, 0.99):.3f}",
                     f"+{pct(side_lags, 0.99) - pct(direct_lags, 0.99):.3f} ms", "<= +0.3 ms"))
        for label, streams, chunks, delay_ms in (
                ("stream: server CPU-us per SSE frame (20 x 500 frames, bursts)", 20, 500, 0),
                ("stream: server CPU-us per SSE frame (20 x 100 frames, 1 ms apart)", 20, 100,
                 1)):
            per_frame: dict[str, list[float]] = {"floor": [], "sidecar": []}
            for _ in range(args.stream_rounds):
                for name in per_frame:
                    per_frame[name].append(cpu_per_frame(urls[name], pids[name], streams,
                                                         chunks, delay_ms))
            ratio = statistics.median(s / f for s, f in zip(per_frame["sidecar"],
                                                           per_frame["floor"], strict=True))
            rows.append((label, "", f"{statistics.median(per_frame['floor']):.1f}",
                         f"{statistics.median(per_frame['sidecar']):.1f}", f"{ratio:.2f}",
                         "<= 1.00"))
        scraped_lags = asyncio.run(scraped_while(
            stream_timings(urls["sidecar"], 10, 64, 20), f"http://127.0.0.1:{one_port}/metrics"))
        rows.append(("stream: the same, p99 ms, with a scrape of /metrics every 100 ms", "",
                     f"{pct(side_lags, 0.99):.3f} unscraped", f"{pct(scraped_lags, 0.99):.3f}",
                     f"+{pct(scraped_lags, 0.99) - pct(side_lags, 0.99):.3f} ms", "<= 2 ms"))
        added_ttfb = statistics.median(side_ttfb) - statistics.median(direct_ttfb)
        rows.append(("stream: time to first byte p50, ms (200 short streams)",
                     f"{statistics.median(direct_ttfb):.3f}", "",
                     f"{statistics.median(side_ttfb):.3f}", f"+{added_ttfb:.3f} ms", "<= 1 ms"))

        held = asyncio.run(hold_streams(urls["sidecar"], args.streams, 10, 500))
        rss = peak_rss_mb(sidecar.pid)
        rows.append((f"{args.streams} concurrent streams (10 x 500 ms): completed, peak RSS",
                     "", "", f"{held}/{args.streams}", f"{rss:.0f} MB", "all, <= 100 MB"))

    # The upstream client alone, ours against aiohttp's (the "floor" column), on the server core.
    alone = subprocess.run(["taskset", "-c", SERVER_CPU, PY, "-m", "tests.bench.clients", "--json",
                            "--rounds", str(args.stream_rounds)], cwd=ROOT, capture_output=True,
                           text=True, check=True)
    for label, theirs, ours, ratio, goal in orjson.loads(alone.stdout.splitlines()[-1]):
        rows.append((label, "", theirs, ours, ratio, goal))

    _print(rows)
    return 0


def _print(rows: list[tuple[str, str, str, str, str, str]]) -> None:
    print(f"\nllm-sidecar gateway benchmark  (python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs; servers on CPU {SERVER_CPU}, load on CPU {LOAD_CPU})\n")
    header = ("measure", "direct mock", "floor: bare aiohttp proxy", "llm-sidecar", "ratio",
              "goal")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(6)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def ab(rev: str, rounds: int, latency_rounds: int, seconds: float,
       extra: tuple[str, str] = ("", "")) -> int:
    """This tree's sidecar (B) against the one at `rev` (A), alternated runs; the same config,
    but for what `extra` appends to A's and to B's (`rev` HEAD with no change in the tree
    and no extra measures the noise: both sides are the same)."""
    work = Path(tempfile.mkdtemp(prefix="sidecar-ab-"))
    other = work / "a"
    subprocess.run(["git", "worktree", "add", "--detach", str(other), rev], cwd=ROOT,
                   check=True, capture_output=True)
    try:
        script = work / "post.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [[{orjson.dumps(CHAT).decode()}]]\n")
        mock_port, a_port, b_port = (free_port() for _ in range(3))
        env = {"BENCH_UPSTREAM_KEY": "sk-bench-not-a-real-key", "PYTHONUNBUFFERED": "1"}
        for name, port, appended in (("a", a_port, extra[0]), ("b", b_port, extra[1])):
            (work / f"{name}.toml").write_text(
                SIDECAR_CONFIG.format(port=port, mock=mock_port, targets=ONE_TARGET)
                + ("\n" + appended.replace("\\n", "\n") + "\n" if appended else ""))
        with process([PY, "-m", "tests.bench.mock", str(mock_port)], LOAD_CPU, mock_port), \
             process([PY, "-m", "sidecar", "serve", "--config", str(work / "a.toml")],
                     SERVER_CPU, a_port, work / "a.log", env, cwd=other) as a, \
             process([PY, "-m", "sidecar", "serve", "--config", str(work / "b.toml")],
                     SERVER_CPU, b_port, work / "b.log", env) as b:
            direct = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
            urls = {"a": f"http://127.0.0.1:{a_port}/v1/chat/completions",
                    "b": f"http://127.0.0.1:{b_port}/v1/chat/completions"}
            pids = {"a": a.pid, "b": b.pid}
            for url in urls.values():
                wrk(url, 8, 1, script)
            runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
            for _ in range(rounds):
                for name, url in urls.items():
                    runs[name].append(wrk(url, 32, seconds, script, pids[name]))
            lat: dict[str, list[dict[str, float]]] = {"direct": [], "a": [], "b": []}
            for _ in range(latency_rounds):
                lat["direct"].append(wrk(direct, 1, seconds, script))
                for name, url in urls.items():
                    lat[name].append(wrk(url, 1, seconds, script))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT,
                       check=False, capture_output=True)
    rps = statistics.median(b_["rps"] / a_["rps"] for a_, b_ in zip(runs["a"], runs["b"],
                                                                   strict=True))
    cpu = statistics.median(a_["cpu_us"] / b_["cpu_us"] for a_, b_ in zip(runs["a"], runs["b"],
                                                                          strict=True))
    rows = [("non-streamed chat, req/s (c=32, 1 core)",
             f"{statistics.median(r['rps'] for r in runs['a']):,.0f}",
             f"{statistics.median(r['rps'] for r in runs['b']):,.0f}", f"{rps:.3f}", ">= 0.98"),
            ("  the same as requests per CPU-second",
             f"{1e6 / statistics.median(r['cpu_us'] for r in runs['a']):,.0f}",
             f"{1e6 / statistics.median(r['cpu_us'] for r in runs['b']):,.0f}", f"{cpu:.3f}",
             ">= 0.98")]
    for q in ("p50", "p99"):
        added = {n: [r[q] - d[q] for r, d in zip(lat[n], lat["direct"], strict=True)]
                 for n in ("a", "b")}
        ratio = statistics.median(y / x for x, y in zip(added["a"], added["b"], strict=True))
        rows.append((f"added latency {q}, ms (c=1)", f"{statistics.median(added['a']):.3f}",
                     f"{statistics.median(added['b']):.3f}", f"{ratio:.3f}",
                     "<= 1.05" if q == "p50" else ""))
    print(f"\nA/B: {rev} (A) against this tree (B), {rounds} + {latency_rounds} alternated "
          "rounds\n")
    for side, appended in zip("AB", extra, strict=True):
        if appended:
            print(f"{side}'s config adds: {appended!r}\n")
    header = ("measure", f"A: {rev}", "B: this tree", "B/A", "goal")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
