"""Progress of a long probe run that reads well both on a terminal and in a CI log.

On a terminal (``stream.isatty()``) a tqdm bar over the units (done/total, elapsed, time
left), its description the current stage. Anywhere else - a CI log, a file, a pipe - no
carriage-return updates at all: one line per stage, and one per finished unit at most every
``interval`` seconds (``drift probe [12/40 units (3 from earlier), 35 s elapsed, about 1.5 min
left]: stage``), so a log holds readable lines instead of thousands of bar redraws. Units read
back from a rerun's shards count as done (``from earlier``) but not in the pace that gives
the time left.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from bkn.probes.sweeps import status


class Progress:
    """``stage(text)`` at each new stage, ``update(k)`` after each unit; ``task``/``end_task`` for a sub-task
    with its own step count (a training run). ``close()`` at the end."""

    def __init__(
        self,
        total: int,
        desc: str = "drift probe",
        stream: TextIO | None = None,
        bar: bool | None = None,
        interval: float = 30.0,
    ):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.done, self.resumed = total, desc, 0, 0
        self.started = self.last_line = time.perf_counter()
        self.interval = interval
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.bar = None
        if isatty() if bar is None else bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="unit", desc=desc, dynamic_ncols=True, file=self.stream)
        self._sub = None

    def _line(self, text: str) -> None:
        self.last_line = time.perf_counter()
        where = status(self.done, self.total, self.resumed, self.started, "units")
        print(f"{self.desc} [{where}]: {text}", file=self.stream, flush=True)

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=True)
        else:
            self._line(text)

    def update(self, count: int = 1, resumed: bool = False, label: str = "") -> None:
        """``count`` more units done: run now, or read back from a shard (``resumed``)."""
        self.done += count
        if resumed:
            self.resumed += count
        if self.bar is not None:
            if resumed:  # done before: not part of the pace tqdm's time left is computed from
                self.bar.initial += count
                self.bar.n += count
                self.bar.last_print_n = self.bar.n
                self.bar.refresh()
            else:
                self.bar.update(count)
                if label:
                    self.bar.set_description_str(label, refresh=False)
        elif not resumed and time.perf_counter() - self.last_line >= self.interval:
            self._line(f"done {label}" if label else "unit done")

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
