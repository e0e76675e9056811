"""Progress where a user waits (progress.py): bars on a terminal or in a notebook, a line every
few seconds when piped, nothing for short work."""
from __future__ import annotations

import sys

import pytest

from cnnlab import progress


@pytest.fixture
def piped(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(progress, "in_notebook", lambda: False)


def test_piped_work_gets_a_line_every_few_seconds_with_the_time_left(piped, monkeypatch):
    clock = iter([0.0, 4.0, 11.0, 15.0, 23.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines = []
    work = progress.Progress(400, "decoding", "images", lines.append)  # starts at t=0
    for _ in range(4):
        work.update(50)  # t = 4, 11, 15, 23: lines at 11 (>= 10 s since 0) and 23 (>= 10 s since 11)
    assert lines == ["decoding: 100/400 images (25%), 9.1 images/s, about 33s left",
                     "decoding: 200/400 images (50%), 8.7 images/s, about 23s left"]


def test_short_piped_work_prints_nothing_and_other_ranks_never_do(piped):
    lines = []
    with progress.Progress(10, "scoring", "images", lines.append) as work:
        work.update(10)
    with progress.Progress(10, "scoring", "images", lines.append, enabled=False, every=0) as work:
        work.update(10)
    assert lines == []


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    lines = []
    with progress.Progress(5, "features", "images", lines.append, every=0) as work:
        assert work.bar is not None and work.bar.total == 5
        work.update(5)
        assert work.bar.n == 5
    assert work.bar is None and lines == []  # the bar, not lines
