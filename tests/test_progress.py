"""Progress output (issue 11, "logs a person can read"): a bar on a terminal, a log line at a modest
interval elsewhere — never one line per step in a file."""
from __future__ import annotations

import logging

from gravprobe.common import _LogProgress, progress


def test_not_a_terminal_gives_log_lines_not_bars(monkeypatch, caplog):
    monkeypatch.delenv("GRAVPROBE_PROGRESS", raising=False)
    bar = progress(range(5000), desc="pretrain softmax", unit="step")   # pytest's stderr is not a tty
    assert isinstance(bar, _LogProgress)
    with caplog.at_level(logging.INFO, logger="gravprobe.progress"):
        assert sum(1 for _ in bar) == 5000
    lines = [r.getMessage() for r in caplog.records if r.name == "gravprobe.progress"]
    assert 1 <= len(lines) <= 2                                         # 5,000 steps in well under 30 s
    assert lines[-1].startswith("pretrain softmax: 5000/5000 step (100 %)") and lines[-1].endswith("- done")


def test_interval_bounds_the_lines(caplog):
    clock = iter(float(t) for t in range(0, 10_000))
    bar = _LogProgress(total=100, desc="generate", unit="shard", interval=10.0)
    bar._time = lambda: next(clock)                                     # one second per call
    bar._start = bar._last = -1.0
    with caplog.at_level(logging.INFO, logger="gravprobe.progress"):
        for _ in range(100):
            bar.update(1)
            bar.set_postfix(loss=1.5)
        bar.close()
        bar.close()                                                      # closing twice logs once
    lines = [r.getMessage() for r in caplog.records]
    assert 8 <= len(lines) <= 13                                          # ~every 10 s of fake clock, not 100
    assert "loss=1.5" in lines[-1] and lines[-1].endswith("- done")


def test_environment_chooses(monkeypatch):
    monkeypatch.setenv("GRAVPROBE_PROGRESS", "bar")
    bar = progress(total=3, desc="x", disable=True)
    assert not isinstance(bar, _LogProgress)
    bar.close()
    monkeypatch.setenv("GRAVPROBE_PROGRESS", "log")
    assert isinstance(progress(total=3), _LogProgress)
