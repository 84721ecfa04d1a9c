"""The training probe's progress report: a bar on a terminal, one line per finished run in a log."""

from __future__ import annotations

import sys
import time

from bkn.probes.sweeps import status
from bkn.probes.training.runs import TrainConfig


class Progress:
    """Progress over ``total`` runs on ``stream`` (stderr): a tqdm bar when it is a terminal (runs done/total,
    elapsed, time left), otherwise one line per finished run with the same (a log gets no carriage-return
    redraws); nothing when not ``enabled``.

    ``concurrent``: runs finish in parallel jobs, so a run's own time is not known here. Runs read back
    from a rerun's shards (``resumed``) count as done but not in the pace that gives the time left."""

    def __init__(self, total: int, enabled: bool = True, stream=None, concurrent: bool = False):
        self.total, self.enabled, self.done_runs, self.resumed, self.concurrent = total, enabled, 0, 0, concurrent
        self.stream = sys.stderr if stream is None else stream
        self.bar = None
        self.started = self.run_started = time.perf_counter()
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="training probe", unit="run", file=self.stream)

    def start(self, config: TrainConfig) -> None:
        self.run_started = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(_name(config))

    def finish(self, config: TrainConfig, rows: list[dict], resumed: bool = False) -> None:
        self.done_runs += 1
        self.resumed += resumed
        if self.bar is not None:
            if resumed:  # done before: not part of the pace tqdm's time left is computed from
                self.bar.initial += 1
                self.bar.n += 1
                self.bar.last_print_n = self.bar.n
                self.bar.refresh()
            else:
                self.bar.update(1)
        elif self.enabled and not resumed:
            acc = [r["value"] for r in rows if r["metric"] == "test_acc" and r["evaluation"] == "running"]
            result = f": test_acc {100 * acc[-1]:.1f}% (running estimates)" if acc else ""
            own = "" if self.concurrent else f" in {time.perf_counter() - self.run_started:.0f} s"
            where = status(self.done_runs, self.total, self.resumed, self.started)
            print(f"training probe [{where}]: {_name(config)}{result}{own}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.resumed:
            print(
                f"training probe: {self.resumed} of {self.total} runs read back from an earlier run's shards",
                file=self.stream,
                flush=True,
            )


def _name(config: TrainConfig) -> str:
    workers = f" on {config.world_size} workers" if config.world_size > 1 else ""
    return f"{config.network} {config.method} g={config.recorded_group_size} seed={config.seed}{workers}"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
