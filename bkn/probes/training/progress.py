"""The training probe's progress report: a bar on a terminal, one line per finished run in a log."""

from __future__ import annotations

import sys
import time

from bkn.probes.training.runs import TrainConfig


class Progress:
    """Progress over ``total`` runs on ``stream`` (stderr): a tqdm bar when it is a terminal, otherwise one
    line per finished run (a log gets no carriage-return redraws); nothing when not ``enabled``.

    ``concurrent``: runs finish in parallel jobs, so a run's own time is not known here; the
    line gives the time since the start instead."""

    def __init__(self, total: int, enabled: bool = True, stream=None, concurrent: bool = False):
        self.total, self.enabled, self.done_runs, self.concurrent = total, enabled, 0, concurrent
        self.stream = sys.stderr if stream is None else stream
        self.bar = None
        self.started = time.perf_counter()
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="training probe", unit="run", file=self.stream)

    def start(self, config: TrainConfig) -> None:
        self.started = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(_name(config))

    def finish(self, config: TrainConfig, rows: list[dict]) -> None:
        self.done_runs += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            acc = [r["value"] for r in rows if r["metric"] == "test_acc" and r["evaluation"] == "running"]
            result = f": test_acc {100 * acc[-1]:.1f}% (running estimates)" if acc else ""
            seconds = time.perf_counter() - self.started
            when = f"{seconds:.0f} s since the start" if self.concurrent else f"{seconds:.0f} s"
            print(
                f"training probe: run {self.done_runs}/{self.total} done, {_name(config)}{result} ({when})",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _name(config: TrainConfig) -> str:
    workers = f" on {config.world_size} workers" if config.world_size > 1 else ""
    return f"{config.network} {config.method} g={config.recorded_group_size} seed={config.seed}{workers}"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
