"""The embedded model's conversion reports its progress: percent done over weighted stages,
once per stage and every few seconds while a stage lasts, relayed from its own process."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.engines import convert
from sidecar.engines.convert import Progress, Report


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_says_percent_done_per_stage_and_while_a_stage_lasts() -> None:
    clock = Clock()
    lines: list[Report] = []
    progress = Progress([("tokenizer", 15), ("weights", 80), ("write", 5)], lines.append,
                        every_s=5.0, clock=clock)
    progress.tick()  # nothing begun: nothing to say
    progress.stage("tokenizer")
    clock.now += 3
    progress.tick()  # too soon after the last line
    progress.stage("weights")
    clock.now += 4.9
    progress.tick()
    clock.now += 0.1
    progress.tick()  # five seconds into a long stage: still alive, still 15%
    progress.stage("write")
    clock.now += 1
    progress.finish()
    assert lines == [
        {"percent": 0, "stage": "tokenizer", "elapsed_s": 0.0},
        {"percent": 15, "stage": "weights", "elapsed_s": 3.0},
        {"percent": 15, "stage": "weights", "elapsed_s": 8.0},
        {"percent": 95, "stage": "write", "elapsed_s": 8.0},
        {"percent": 100, "stage": "done", "elapsed_s": 9.0},
    ]


def test_the_stage_shares_add_up_to_the_whole() -> None:
    lines: list[Report] = []
    progress = Progress(convert.STAGES, lines.append)
    for name, _ in convert.STAGES:
        progress.stage(name)
    progress.finish()
    percents = [line["percent"] for line in lines]
    assert percents == sorted(percents) and percents[0] == 0 and percents[-1] == 100


def test_a_failed_conversion_says_why_in_one_line(tmp_path: Path) -> None:
    """The child's reports are relayed as they come; its failure is an error that quotes
    its last line, not a traceback."""
    missing = tmp_path / "nothing.gguf"
    reports: list[Report] = []
    with pytest.raises(RuntimeError) as caught:
        convert.run(missing, tmp_path / "model", reports.append)
    assert "nothing.gguf" in str(caught.value) and "Traceback" not in str(caught.value)
    assert reports[0]["stage"] == "loading the libraries" and reports[0]["percent"] == 0
    assert reports[-1]["stage"] == "reading the tokenizer"  # where it failed
    assert not (tmp_path / "model").exists()


def test_a_conversion_that_does_not_end_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as caught:
        convert.run(tmp_path / "nothing.gguf", tmp_path / "model", lambda _: None,
                    limit_s=0.05)
    assert "did not end within" in str(caught.value)
