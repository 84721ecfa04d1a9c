"""``python -m bkn.probes.drift``: the drift probe's command line (see ``--help``)."""

from __future__ import annotations

import argparse
import sys
import time

from bkn.probes import cli, sources
from bkn.probes.drift import methods, setups, units
from bkn.probes.drift.sweep import ProbeConfig

DEFAULT_SETUPS = [("synthetic", "residual-chain"), ("digits", "cifar-resnet20")]
FULL_SETUPS = list(setups.INPUT_SIZE)
DEFAULT_SIZES, FULL_SIZES = [1, 2, 4, 16], [1, 2, 4, 8, 16, 32, 64]
DEFAULT_STATES = [setups.OWN]  # the real-data networks' states by default; --full: setups.STATES
DEFAULT_JOBS = 2
DEFAULT_SEEDS, FULL_SEEDS = [0, 1], [0, 1, 2, 3, 4]

EPILOG = (
    """
what is measured (docs/design.md §9): per method, normalization group size n, layer and seed,
the statistics the method normalizes with in training mode (BN: the group's batch
statistics; BKN: its posterior; BRN: its effective statistics; <method>-ema: the running
estimates) against the layer's exact population statistics:
  per layer, median and 90th percentile over groups x channels of mean_error
  |m_hat - m| / sqrt(v), var_logratio |log(v_hat / v)|, kl KL(N(m, v) || N(m_hat, v_hat)),
  output_discrepancy ||y_train - y_pop||^2 / ||y_pop||^2 (every method, GN and LN included),
  input_mean_drift / input_var_drift (the layer's input against its population-mode input,
  same samples: what upstream layers did); and the error split over groups into bias and
  noise, mean_bias/mean_noise/mean_rmse (population sigma) and var_* (relative), with
  rmse^2 = bias^2 + noise^2;
  end to end (layer "output"): agreement of the predictions of the network in training mode
  with those of the same network using population statistics, logit_discrepancy
  ||z_train - z_pop||^2 / ||z_pop||^2, accuracy in training mode (and accuracy_population).
modes: in-network (as the network runs), isolation (every earlier layer normalizes with its
population statistics and hands them on as BKN's posterior: each layer's own error alone).
states: init, trained (weights trained with BN), trained-own (trained with the measured
method, at normalization group 4). For BKN the population statistics are the reference, not
what it uses at inference (its running estimates: '<method>-ema').
synthetic/residual-chain: a residual linear-Gaussian chain with closed-form truth and a real
floor ('floor': the best estimate a group can give; error/floor >= 1 for every method that
estimates from its group alone - BN, BKN; BRN and running estimates pool earlier batches).

default run (minutes on 2 cores: 5.2 with a cold cache on a busy machine; fewer cached): setups
synthetic/residual-chain (init) and digits/cifar-resnet20 (trained-own), both modes, group
sizes 1,2,4,16, seeds 0,1, methods BN, BKN with both transitions, BRN, GN, their running
estimates and the floor:
  """
    + ",".join(methods.DEFAULT_METHODS)
    + """
(name others in --methods); --states trained,trained-own adds the BN-trained network.
--full: every setup (adds photos/cifar-resnet20, digits/resnet18, photos/resnet18), states
init, trained and trained-own, group sizes 1..64, seeds 0..4, every method but
'brn-scheduled' (the paper's schedule keeps BRN equal to BN for 5000 steps, far more than a
unit's forwards: name it in --methods to measure it): about 60x the default's units, on
bigger networks, so many hours (measure a part first). Trained weights (short seeded training
runs, bkn.probes.engine's engine) are cached under --cache, keyed by their configuration, and
trained --jobs at a time before the units.

methods (bkn.methods, plus the probe's own estimators): """
    + ", ".join(methods.names())
    + """

examples:
  python -m bkn.probes.drift                                  # the default probe (minutes)
  python -m bkn.probes.drift --full                           # the full sweep
  python -m bkn.probes.drift --methods bn,bkn-official --group-sizes 2,4 --seeds 0 --data digits
  python -m bkn.probes.drift --full --executor dask:local --jobs 8   # the units on 8 Dask worker processes
  python -m bkn.probes.drift --model timm:resnet18 --data imagefolder:PATH --image-size 32   # your model, your data

interrupted? Each unit's rows are saved in OUT/shards/drift/ as it ends: the same command again
runs only the units not saved yet (--fresh starts over).
"""
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bkn.probes.drift",
        description="The drift probe: how far each normalization method's statistics drift from the "
        "population statistics, by normalization group size and depth. Writes tidy results to "
        "OUT/drift.parquet and OUT/meta.json and prints a summary.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--full", action="store_true", help="the full sweep (all setups, group sizes 1..64, 5 seeds)")
    cli.add_shared_flags(
        p,
        methods=f"default: {','.join(methods.DEFAULT_METHODS)}",
        group_sizes=f"default {','.join(map(str, DEFAULT_SIZES))}; --full {','.join(map(str, FULL_SIZES))}",
        seeds="micro-batch sampling and Monte-Carlo draws; default 0,1; --full 0..4",
        threads=1,
        threads_help="; the probe runs many small ops, and on a shared 2-core machine 2 threads ran it 6-10x slower",
        out="results/accuracy",
        check_methods=methods.resolve,
    )
    p.add_argument(
        "--data",
        type=cli.name_list,
        help=f"only setups on these data ({', '.join(setups.DATA)}); or your data: {sources.DATA_HELP}",
    )
    sources.add_flags(p)
    p.add_argument(
        "--networks", type=cli.name_list, help=f"only setups with these networks ({', '.join(setups.NETWORKS)})"
    )
    p.add_argument(
        "--states",
        type=cli.name_list,
        help="states of the real-data networks: init,trained,trained-own (default trained-own; --full all)",
    )
    p.add_argument("--modes", type=cli.name_list, help="in-network,isolation (default both)")
    p.add_argument(
        "--steps", type=cli.positive_int, default=10, help="measured training-mode forwards per unit (default 10)"
    )
    p.add_argument(
        "--burn-in", type=cli.positive_int, default=20, help="warm-up forwards per unit before measuring (default 20)"
    )
    p.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=16,
        help="samples per forward; the groups of n live in it (default 16, or n if larger)",
    )
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the network weights and training (default 0)")
    p.add_argument("--cache", default="results/cache", help="weights cache folder (default results/cache)")
    p.add_argument(
        "--jobs",
        type=cli.positive_int,
        default=DEFAULT_JOBS,
        help="processes (one thread each) for the training runs the cache lacks, run before the units, which "
        f"run in this process (default {DEFAULT_JOBS}); with --executor local or dask:local, its processes",
    )
    cli.add_sweep_flags(p, jobs="every unit in this process, the training runs in --jobs processes")
    return p


def config_from(args: argparse.Namespace) -> ProbeConfig:
    data, nets = list(args.data or ["photos"]), list(args.networks or ["cifar-resnet20"])
    user = sources.user_setups(args, data, nets, "accuracy")
    pairs = user or _built_in_setups(args)
    return ProbeConfig(
        setups=pairs,
        states=list(args.states or (list(setups.STATES) if args.full else DEFAULT_STATES)),
        modes=list(args.modes or units.MODES),
        methods=list(args.methods or (methods.FULL_METHODS if args.full else methods.DEFAULT_METHODS)),
        group_sizes=list(args.group_sizes or (FULL_SIZES if args.full else DEFAULT_SIZES)),
        seeds=list(args.seeds or (FULL_SEEDS if args.full else DEFAULT_SEEDS)),
        batch_size=args.batch_size,
        burn_in=args.burn_in,
        steps=args.steps,
        weights_seed=args.weights_seed,
        cache=args.cache,
    )


def _built_in_setups(args: argparse.Namespace) -> list[tuple[str, str]]:
    pairs = FULL_SETUPS if (args.full or args.data or args.networks) else DEFAULT_SETUPS
    for name, known in (("data", setups.DATA), ("networks", setups.NETWORKS)):
        unknown = [v for v in (getattr(args, name) or []) if v not in known]
        if unknown:
            raise ValueError(f"unknown {name} {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if args.data:
        pairs = [p for p in pairs if p[0] in args.data]
    if args.networks:
        pairs = [p for p in pairs if p[1] in args.networks]
    if not args.full and not args.networks:  # a data filter alone keeps the default network per data
        defaults = {d: n for d, n in DEFAULT_SETUPS}
        defaults.setdefault("photos", "cifar-resnet20")
        pairs = [p for p in pairs if defaults.get(p[0]) == p[1]]
    if not pairs:
        raise ValueError(
            f"no setup matches --data {args.data} --networks {args.networks}; the setups are: "
            + ", ".join(f"{d}/{n}" for d, n in FULL_SETUPS)
        )
    return pairs


def record_units(config: ProbeConfig) -> int:
    from bkn.probes.drift import Probe

    return len(Probe(config).units())


def print_summary(frame, record: dict) -> None:
    from bkn.probes.drift import summary

    for title, table in summary.tables(frame):
        print("\n" + title)
        print(summary.format_table(table))
    print("\nnote: " + record["config"]["notes"][0])
    if record["skipped"]:
        reasons = {}
        for s in record["skipped"]:
            reasons.setdefault((s["method"], s["data"], s["group_size"]), s["reason"])
        print(f"\nskipped {len(record['skipped'])} unit(s) (details in meta.json):")
        for (method, data, n), reason in list(reasons.items())[:8]:
            print(f"  {method} on {data} at group size {n}: {reason[:150]}")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from(args)
        config.validate()
    except ValueError as err:
        p.error(str(err))

    import torch

    from bkn.probes.drift import run
    from bkn.probes.results import DRIFT

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        with cli.open_executor(args) as executor:
            frame, record = run(
                config, not args.no_progress, args.jobs, out=args.out, executor=executor, fresh=args.fresh
            )
    except ValueError as err:
        p.error(str(err))
    except KeyboardInterrupt:
        print(cli.interrupted(args.out, DRIFT, record_units(config)), file=sys.stderr)
        return 130
    record["arguments"] = {k: (str(v) if k == "out" else v) for k, v in vars(args).items()}
    record["argv"] = sys.argv[1:] if argv is None else list(argv)
    parquet, meta = DRIFT.write(frame, record, args.out)
    print_summary(frame, record)
    print(f"\n{len(frame)} rows in {time.perf_counter() - started:.0f} s -> {parquet} (and {meta})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
