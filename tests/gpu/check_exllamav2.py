"""The GPU check: ExLlamaV2 behind the sidecar on a CUDA machine, offline.

    tests/gpu/prepare.sh                            # with network: wheels + model files,
                                                    # into tests/gpu/bundle/ (~20 MB)
    python tests/gpu/check_exllamav2.py prepare OUT   # the model files alone: config,
                                                    # tokenizer, template (~4 MB)
    python tests/gpu/check_exllamav2.py run DIR       # on the GPU machine (see prepare.sh)

`run` builds a model directory for ExLlamaV2 in DIR/model: from the embedded SmolLM2 weights
when DIR/weights/model.safetensors is there (FP16, ~330 MB, carried separately), otherwise
with random weights of the same architecture (transformers), which serves the throughput
rows but not the answer check. It then starts the sidecar with engine = "exllamav2", asks one
question through the `openai` client, runs 1, 8 and 32 concurrent streams through the sidecar,
the same through the raw dynamic generator, and prints a table of tokens/s and ratios.
Everything it needs is local: no network is used.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
TOKENS = 256


def prepare(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from sidecar.engines import models

    source = models.resolve("builtin:smollm2-135m-instruct")
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(source / name, out / name)
    print(f"prepared {out} from {source}")


def build_model(work: Path) -> tuple[Path, bool]:
    """The model directory, and whether its weights are the real ones."""
    model = work / "model"
    model.mkdir(exist_ok=True)
    for name in FILES:
        shutil.copy(work / name, model / name)
    real = work / "weights" / "model.safetensors"
    if real.is_file():
        shutil.copy(real, model / "model.safetensors")
        return model, True
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from sidecar.engines.convert import save_model_dir

    config = AutoConfig.from_pretrained(model)
    torch.manual_seed(0)
    network = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    save_model_dir(network, AutoTokenizer.from_pretrained(model), model)
    return model, False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sidecar(model: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = work / "sidecar.toml"
    config.write_text(f"""
[server]
port = {port}
[logging]
requests = false
[providers.gpu]
kind = "local"
engine = "exllamav2"
model = "{model}"
max_seq_len = 2048
max_batch_size = 32
max_queue = 64
[models."gpu"]
targets = [ {{ provider = "gpu" }} ]
[routing]
probe_interval_s = 0
state_file = "{work / 'routes.json'}"
""")
    log = (work / "sidecar.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sidecar exited:\n{(work / 'sidecar.log').read_text()[-4000:]}")
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the model did not load within 600 s")


async def through_sidecar(url: str, streams: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)

    async def one(i: int) -> int:
        count = 0
        stream = await client.chat.completions.create(
            model="gpu", messages=STORY, max_tokens=TOKENS, temperature=0.8, seed=i,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage:
                count = chunk.usage.completion_tokens
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    return sum(counts) / (time.perf_counter() - started)


def raw_generator(model: Path, streams: int) -> float:
    """The same jobs on ExLlamaV2's own dynamic generator, no sidecar."""
    sys.path.insert(0, str(ROOT))
    from sidecar.engines.exllamav2 import load_runtime, sampler_settings
    from sidecar.engines.job import Params

    runtime = raw_generator.runtime if hasattr(raw_generator, "runtime") else None  # type: ignore[attr-defined]
    if runtime is None:
        runtime = load_runtime(model, 2048, 32, "fp16")
        raw_generator.runtime = runtime  # type: ignore[attr-defined]
    ids = runtime.prompting.encode(runtime.prompting.render_chat(STORY))
    for i in range(streams):
        params = Params(max_tokens=TOKENS, temperature=0.8, seed=i)
        runtime.generator.enqueue(runtime.new_job(
            input_ids=runtime.input_ids(ids), max_new_tokens=TOKENS,
            gen_settings=sampler_settings(runtime.new_settings(), params), seed=i,
            stop_conditions=sorted(runtime.eos_ids), identifier=i))
    started, total = time.perf_counter(), 0
    while runtime.generator.num_remaining_jobs():
        for result in runtime.generator.iterate():
            if result.get("stage") == "streaming" and result.get("eos"):
                total += int(result["new_tokens"])
    return total / (time.perf_counter() - started)


def run(work: Path) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
    model, real = build_model(work)
    proc, url = start_sidecar(model, work)
    try:
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="gpu", messages=QUESTION, temperature=0,  # type: ignore[arg-type]
                                               max_tokens=40)
        answer = reply.choices[0].message.content or ""
        print(f"answer ({'real' if real else 'random'} weights): {answer!r}; "
              f"finish {reply.choices[0].finish_reason}; usage {reply.usage}")
        import json
        import urllib.request

        with urllib.request.urlopen(url + "/admin/api/engines", timeout=30) as shown:
            print(f"engines: {json.dumps(json.load(shown))}")  # gpu_bytes: the load's GPU memory
        if real and "Paris" not in answer:
            print("FAIL: the real model did not answer Paris")
            return 1
        side = {n: asyncio.run(through_sidecar(url, n)) for n in (1, 8, 32)}
    finally:
        proc.terminate()
        proc.wait(30)
    raw = {n: raw_generator(model, n) for n in (1, 8, 32)}
    print("| concurrent streams | raw dynamic generator tokens/s | through the sidecar | ratio |")
    print("|---|---|---|---|")
    for n in (1, 8, 32):
        print(f"| {n} | {raw[n]:.0f} | {side[n]:.0f} | {side[n] / raw[n]:.2f} |")
    print("goal: 32 streams >= 0.90")
    return 0 if side[32] / raw[32] >= 0.90 else 1


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "run"):
        print(__doc__)
        return 2
    path = Path(sys.argv[2]).resolve()
    if sys.argv[1] == "prepare":
        prepare(path)
        return 0
    return run(path)


if __name__ == "__main__":
    sys.exit(main())
