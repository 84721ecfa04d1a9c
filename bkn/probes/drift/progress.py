"""Progress of a long probe run that reads well both on a terminal and in a CI log.

On a terminal (``stream.isatty()``) a tqdm bar over the units, its description the current
stage. Anywhere else - a CI log, a file, a pipe - no carriage-return updates at all: one
line per stage (``drift probe [units done/total, elapsed]: stage``), so a log holds a few
dozen readable lines instead of thousands of bar redraws.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    """``stage(text)`` at each new stage, ``update(k)`` after each unit; ``task``/``end_task`` for a sub-task
    with its own step count (a training run). ``close()`` at the end."""

    def __init__(self, total: int, desc: str = "drift probe", stream: TextIO | None = None, bar: bool | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.done = total, desc, 0
        self.started = time.perf_counter()
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.bar = None
        if isatty() if bar is None else bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="unit", desc=desc, dynamic_ncols=True, file=self.stream)
        self._sub = None

    def _line(self, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"{self.desc} [{self.done}/{self.total} units, {elapsed:.0f} s]: {text}", file=self.stream, flush=True)

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=True)
        else:
            self._line(text)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)

    def task(self, text: str, steps: int) -> Callable[[], None]:
        """Announce a sub-task of ``steps`` steps; returns the per-step callback (a bar only on a terminal)."""
        if self.bar is None:
            self._line(text)
            return lambda: None
        from tqdm.auto import tqdm

        self._sub = tqdm(total=steps, desc=text, unit="step", leave=False, file=self.stream)
        return self._sub.update

    def end_task(self) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    def close(self) -> None:
        self.end_task()
        if self.bar is not None:
            self.bar.close()
        else:
            self._line("done")
