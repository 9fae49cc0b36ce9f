"""Converting the embedded model's GGUF file into a model directory, in a process of its own.

The conversion takes from tens of seconds to minutes, and while it runs it holds the GGUF
reader, the dequantized weights and the libraries' conversion code: about 300 MB that a server
doing it in-process kept for its whole life (1.24 GB resident after a first start against
0.96 GB after a later one, measured). So the server's loading thread runs
`python -m sidecar.engines.convert GGUF_FILE TARGET`, which prints its progress as one JSON
object per line on its standard output, and logs each as it comes (see `run`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

# What each stage costs, as a share of the whole (measured on two busy cores: importing torch
# and transformers 15 s, the tokenizer 16 s, reading and dequantizing the weights 84 s,
# writing 3 s), so that percent done tracks time spent.
STAGES = (("loading the libraries", 10), ("reading the tokenizer", 15),
          ("reading the weights", 70), ("writing the model directory", 5))
REPORT_EVERY_S = 5.0
# A conversion that has not ended by then is stuck (it takes minutes on a slow machine).
LIMIT_S = 1800.0

Report = dict[str, Any]


class Progress:
    """Percent done over weighted stages: one report when a stage begins, and one every
    `every_s` while it lasts (call `tick` from a timer), so a log shows it is alive."""

    def __init__(self, stages: Sequence[tuple[str, int]], emit: Callable[[Report], None],
                 every_s: float = REPORT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stages = list(stages)
        self._total = sum(weight for _, weight in self._stages) or 1
        self._emit = emit
        self._every = every_s
        self._clock = clock
        self._started = clock()
        self._index = -1
        self._last = self._started
        self._lock = threading.Lock()  # stages advance on one thread, ticks come from another

    def stage(self, name: str) -> None:
        with self._lock:
            names = [stage for stage, _ in self._stages]
            self._index = names.index(name)
            self._report()

    def tick(self) -> None:
        with self._lock:
            if self._index >= 0 and self._clock() - self._last >= self._every:
                self._report()

    def finish(self) -> None:
        with self._lock:
            self._index = len(self._stages)
            self._report()

    def _report(self) -> None:
        now = self._clock()
        self._last = now
        done = sum(weight for _, weight in self._stages[:self._index])
        stage = self._stages[self._index][0] if self._index < len(self._stages) else "done"
        self._emit({"percent": round(100 * done / self._total), "stage": stage,
                    "elapsed_s": round(now - self._started, 1)})


def run(gguf: Path, target: Path, report: Callable[[Report], None],
        limit_s: float = LIMIT_S) -> None:
    """Convert in a child process, passing each progress report to `report` as it comes
    (blocking: call it from a thread). Raises RuntimeError with the child's last words."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                       os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "sidecar.engines.convert", str(gguf), str(target)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, env=env)
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            child.kill()

        timer = threading.Timer(limit_s, stop)
        timer.start()
        try:
            assert child.stdout is not None
            for item in _reports(child.stdout):
                report(item)
            code = child.wait()
        finally:
            timer.cancel()
            if child.poll() is None:
                child.kill()
                child.wait()
        if stopped.is_set():
            raise RuntimeError(f"the conversion did not end within {limit_s:.0f} s")
        if code != 0:
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit status {code}"
            raise RuntimeError(why[:500])


def _reports(stream: IO[bytes]) -> Iterator[Report]:
    for line in stream:
        if len(line) > 4096:
            continue  # not ours
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and isinstance(item.get("percent"), int):
            yield {key: item[key] for key in ("percent", "stage", "elapsed_s") if key in item}


def convert(gguf: Path, target: Path, progress: Progress) -> None:
    """GGUF -> FP16 safetensors + tokenizer + chat template, written atomically."""
    progress.stage("loading the libraries")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidecar.engines.hf import quiet_transformers

    quiet_transformers()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        progress.stage("reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        progress.stage("reading the weights")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float16)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights written are plain FP16
        progress.stage("writing the model directory")
        save_model_dir(model, tokenizer, work)
        if target.exists() and not (target / "model.safetensors").is_file():
            shutil.rmtree(target)  # a leftover without weights, not another's finished copy
        try:
            os.replace(work, target)
        except OSError:
            # Another process finished converting first (it renames atomically too): its
            # copy is as good as ours, and may be in use.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress.finish()


def save_model_dir(model: Any, tokenizer: Any, path: Path) -> None:
    """A model directory both engines read: FP16 safetensors with every tensor written out
    (ExLlamaV2 expects `lm_head` even where the embeddings are tied), config.json with the
    fields ExLlamaV2 reads (`architectures`, `rope_theta`), the tokenizer and the template."""
    from safetensors.torch import save_file

    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # tied to a tensor already written: its own copy
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        state[name] = tensor
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.setdefault("architectures", [type(model).__name__])
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and isinstance(rope, dict) and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")


def main(argv: Sequence[str]) -> int:
    gguf, target = Path(argv[0]), Path(argv[1])
    # Progress goes on the standard output we were given; whatever a library prints goes
    # to the standard error, so the reports stay one JSON object per line.
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(item: Report) -> None:
        out.write(json.dumps(item) + "\n")

    progress = Progress(STAGES, emit)
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(1.0):
            progress.tick()

    threading.Thread(target=ticker, name="convert-progress", daemon=True).start()
    try:
        convert(gguf, target, progress)
    except ImportError as exc:
        print(f"it needs torch and transformers ({exc.name} is missing): "
              "pip install 'llm-sidecar[cpu]'", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line for the server's log
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
