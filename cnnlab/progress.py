"""Progress where a user waits: tqdm's bar on a terminal, its widget in a Jupyter notebook
(tqdm.auto picks it), and where output goes to a file or a pipe one line every ``EVERY`` seconds
with the rate and the time left; nothing for work done sooner than that."""
from __future__ import annotations

import sys
import time
from typing import Callable

EVERY = 10.0  # seconds between lines when piped: a log stays readable, a wait never looks hung


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython over ZeroMQ)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def interactive() -> bool:
    """A terminal or a notebook shows bars; a file or a pipe gets lines."""
    return sys.stderr.isatty() or in_notebook()


def bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A bar counting to ``total`` ``unit``s, or None where none is shown (``enabled`` False, or
    output that is neither a terminal nor a notebook)."""
    if not enabled or not interactive():
        return None
    from tqdm.auto import tqdm  # loaded once a bar is shown: a piped run never imports it
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


class Progress:
    """``total`` ``unit``s of work called ``desc``: ``update(n)`` as they are done. A bar where
    one shows; else, through ``log``, a line every ``every`` seconds (none at all for shorter
    work; without ``log``, to stderr); nothing when ``enabled`` is False (ranks other than 0)."""

    def __init__(self, total: int, desc: str, unit: str, log: Callable[[str], None] | None = None,
                 enabled: bool = True, every: float = EVERY):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.log = log or _to_stderr  # stdout may be a result (JSON) a pipe reads
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = bar(total, desc, unit, enabled and total > 0)
        self.quiet = not enabled

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if not self.quiet and now - self.last >= self.every:
            self.last = now
            self.log(self.line(now))

    def line(self, now: float) -> str:
        """``desc: done/total unit (percent), rate, time left``."""
        spent = now - self.start
        rate = self.done / spent if spent > 0 else 0.0
        left = f", about {(self.total - self.done) / rate:.0f}s left" if rate > 0 else ""
        return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({self.done / max(self.total, 1):.0%}), "
                f"{rate:.1f} {self.unit}/s{left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
