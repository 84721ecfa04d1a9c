"""The run's clock, budgets, progress lines and rows: :class:`Run` and :class:`Part`."""

from __future__ import annotations

import math
import pathlib
import time

STATUSES = ("ok", "failed", "skipped")


class Part:
    """One part's time: it ends at its point of the run's schedule (the budgets of this part and every earlier
    one, from the run's start, capped at the run's budget), so time an earlier part left over carries on."""

    def __init__(self, run: Run, name: str, budget_s: float):
        self.run, self.name = run, name
        run.scheduled += budget_s
        self.ends_at = min(run.scheduled, run.budget_s)  # seconds after the run's start
        self.deadline = run.start + self.ends_at

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self, need_s: float = 0.0) -> bool:
        """True when less than ``need_s`` seconds are left (nothing should start that cannot finish)."""
        return self.left() <= need_s

    def why(self) -> str:
        return f"out of time: the {self.name} part had until {self.ends_at:.0f} s of the run's {self.run.budget_s:.0f}"


class Run:
    """The whole run: start time, overall budget, the log file, and the rows every part adds.

    ``say`` prints a progress line with the elapsed time (and appends it to the log); ``add``
    records one row (the schema's own columns; the environment is added when the file is written).
    """

    def __init__(self, budget_s: float, log_path: pathlib.Path | None = None, echo: bool = True):
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.rows: list[dict] = []
        self.scheduled = 0.0  # the sum of the budgets of the parts started so far
        self.lines: list[str] = []
        self.log_path, self.echo = log_path, echo
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f} s] {text}"
        self.lines.append(line)
        if self.echo:
            print(line, flush=True)
        if self.log_path is not None:
            with self.log_path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")

    def part(self, name: str, budget_s: float) -> Part:
        return Part(self, name, budget_s)

    def add(
        self,
        part: str,
        item: str,
        metric: str,
        value: float = math.nan,
        *,
        shape: str = "",
        dtype: str = "",
        mode: str = "",
        target: float | None = None,
        status: str = "ok",
        note: str = "",
    ) -> None:
        if status not in STATUSES:
            raise ValueError(f"row status must be one of {STATUSES}, got {status!r}")
        self.rows.append(
            {
                "part": part,
                "item": item,
                "shape": shape,
                "dtype": dtype,
                "mode": mode,
                "metric": metric,
                "value": float(value) if value is not None else math.nan,
                "target": math.nan if target is None else float(target),
                "status": status,
                "note": note,
            }
        )

    def skip(self, part: str, item: str, why: str, **where) -> None:
        """A row saying that ``item`` of ``part`` did not run, and why."""
        self.add(part, item, "skipped", status="skipped", note=why, **where)
        self.say(f"{part}: {item} {' '.join(str(v) for v in where.values() if v)} skipped: {why}")

    def fail(self, part: str, item: str, exc: BaseException | str, **where) -> None:
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        text = text.strip().replace("\n", " | ")[:600]
        self.add(part, item, "error", status="failed", note=text, **where)
        self.say(f"{part}: {item} {' '.join(str(v) for v in where.values() if v)} FAILED: {text[:200]}")
