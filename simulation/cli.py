"""``hermes-sim``: the whole federation on one machine.

    hermes-sim run [--sites A.yaml B.yaml ...] [--rounds N] [--local-iterations K] [--run-dir DIR]
                   [--gpus-per-site 0.25] [--cpus-per-site C] [--quick] [--local-only] [--resume]
                   [--ray-address HOST:PORT]
    hermes-sim centralized [--sites ...] [same options]
    hermes-sim compare RUN_A RUN_B ... [--out compare_dice.png]   (+ compare_curves.png beside it)

Without ``--sites`` the bundled demo federation (``site_configs/demo/*.yaml``) is used.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hermes_model.exchange import LOCAL_UPDATES
from hermes_model.factory import available_models
from server.config import STRATEGIES
from server.outer import OUTER_OPTIMIZERS
from simulation.compare import (
    COMPARE_CURVES_PNG,
    COMPARE_PNG,
    format_comparison,
    load_runs,
    write_comparison,
    write_curves,
)
from simulation.run import (
    DEFAULT_BASE_CHANNELS,
    DEFAULT_LOCAL_ITERATIONS,
    DEFAULT_PATCH,
    DEFAULT_ROUNDS,
    DEFAULT_SPACING,
    QUICK_LOCAL_ITERATIONS,
    QUICK_ROUNDS,
    SimOptions,
    describe,
    run_mode,
)

logger = logging.getLogger(__name__)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", nargs="+", type=Path, default=[], metavar="SITE.yaml",
                        help="site config files (default: the bundled demo federation "
                        "site_configs/demo/*.yaml)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"federated rounds (default {DEFAULT_ROUNDS}; --quick: {QUICK_ROUNDS}); local-only and "
                        "centralized train the same number of rounds of --local-iterations steps")
    parser.add_argument("--local-iterations", type=int, default=None,
                        help=f"optimiser steps per site per round (default {DEFAULT_LOCAL_ITERATIONS}; "
                        f"--quick: {QUICK_LOCAL_ITERATIONS})")
    parser.add_argument("--model", default="hermes-r", choices=available_models(),
                        help="the network (default hermes-r)")
    parser.add_argument("--base-channels", type=int, default=DEFAULT_BASE_CHANNELS,
                        help=f"Hermes-R width (default {DEFAULT_BASE_CHANNELS})")
    parser.add_argument("--spacing", type=_xyz_arg(float), default=DEFAULT_SPACING, metavar="MM",
                        help="the plan's target spacing in mm, one number or x,y,z (default "
                        f"{DEFAULT_SPACING[0]:g}: the demo's; the recipe's is 1.5)")
    parser.add_argument("--patch-size", type=_xyz_arg(int), default=DEFAULT_PATCH, metavar="VOXELS",
                        help="the plan's patch (and inference window) size, one number or x,y,z, multiples of 16 "
                        f"(default {DEFAULT_PATCH[0]}: the demo's; the recipe's is 128)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="folder for everything of the run (default: a new folder under runs/)")
    parser.add_argument("--gpus-per-site", type=float, default=None,
                        help="fraction of a GPU per virtual site, e.g. 0.25 = four sites per GPU "
                        "(default: the visible GPUs shared by the sites; 0 without a GPU)")
    parser.add_argument("--cpus-per-site", type=int, default=None,
                        help="CPU cores per virtual site, a whole number; sites beyond the machine's cores wait "
                        "for a free one (default: the cores shared by the sites, at least 1 each; with fewer cores "
                        "than sites all sites run at once and time-share the cores, one process per site in memory)")
    parser.add_argument("--evaluate-every", type=int, default=None,
                        help="evaluate on the validation splits (whole scans) every N rounds and in the last "
                        "(default: five times in a run of six rounds or more, a curve of Dice; else the last round "
                        "only; 1 = every round)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the patches")
    parser.add_argument("--lr", type=float, default=2e-3, help="base learning rate (LAMB, default 0.002)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 rounds of 10 steps on two demo sites (about 2 minutes on a "
                        "laptop)")
    parser.add_argument("--quiet", action="store_true", help="do not copy Flower's output to the console")


def _xyz_arg(kind: type):
    def parse(text: str) -> tuple:
        try:
            values = [kind(v) for v in text.replace(",", " ").split()]
        except ValueError:
            values = []
        if len(values) not in (1, 3) or not all(v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"must be one positive number or three (x,y,z), got {text!r}")
        return tuple(values * 3 if len(values) == 1 else values)

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hermes-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="federated training in the Flower simulation engine (or --local-only)")
    _add_run_options(run)
    run.add_argument("--resume", action="store_true",
                     help="continue the federated run in --run-dir from its latest checkpoint up to --rounds")
    run.add_argument("--local-only", action="store_true",
                     help="each site trains alone for the same number of local steps (no Flower)")
    run.add_argument("--strategy", choices=STRATEGIES, default="fedavg",
                     help="server aggregation (default fedavg; fedprox needs --proximal-mu > 0)")
    run.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx's proximal weight mu")
    run.add_argument("--server-optimizer", choices=OUTER_OPTIMIZERS, default=SimOptions.server_optimizer,
                     help="what the server does with the mean of the sites' updates (default "
                     f"{SimOptions.server_optimizer}; nesterov: DiLoCo's outer step; sgd: at --server-lr 1, FedAvg; "
                     "adam: FedAdam; lamb: the recipe's LAMB)")
    run.add_argument("--local-update", choices=LOCAL_UPDATES, default="steps",
                     help="steps (default: --local-iterations optimiser steps per round) or gradient (one batch's "
                     "gradient per round, combined into the union batch's: with --server-optimizer lamb and "
                     "--local-iterations 1 this is centralized training)")
    run.add_argument("--reset-local-state", action="store_true",
                     help="every round starts the sites' optimiser from fresh moments (default: kept between rounds)")
    run.add_argument("--server-lr", type=float, default=None,
                     help="the server optimiser's learning rate (default: sgd 1, nesterov 0.7, adam 0.01, lamb --lr)")
    run.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                     help="run the virtual sites on the existing Ray cluster whose head is at HOST:PORT (as given to "
                     "`ray start --address`); CPUs and GPUs per site then come from the cluster's nodes, and every "
                     "node must see the same environment and paths (README, 'Running on a Ray cluster'). Default: "
                     "the RAY_ADDRESS environment variable if set, else a private Ray on this machine; 'local' "
                     "forces the private one")
    central = sub.add_parser("centralized", help="one model on the pooled training splits of the sites")
    _add_run_options(central)
    compare = sub.add_parser("compare",
                             help="side-by-side Dice of several runs (table, bar plot, validation Dice curves)")
    compare.add_argument("runs", nargs="+", type=Path, help="run directories")
    compare.add_argument("--out", type=Path, default=None,
                         help=f"bar plot path (default: {COMPARE_PNG} in the first run directory; the curves "
                         f"go beside it as {COMPARE_CURVES_PNG})")
    return parser


def _options(args: argparse.Namespace) -> SimOptions:
    return SimOptions(
        sites=list(args.sites), rounds=args.rounds, local_iterations=args.local_iterations,
        model=args.model, base_channels=args.base_channels, spacing=args.spacing, patch_size=args.patch_size,
        run_dir=args.run_dir, cpus_per_site=args.cpus_per_site,
        gpus_per_site=args.gpus_per_site, evaluate_every=args.evaluate_every, seed=args.seed, lr=args.lr,
        quick=args.quick, echo=not args.quiet, resume=getattr(args, "resume", False),
        strategy=getattr(args, "strategy", "fedavg"), proximal_mu=getattr(args, "proximal_mu", 0.0),
        server_optimizer=getattr(args, "server_optimizer", SimOptions.server_optimizer),
        local_update=getattr(args, "local_update", "steps"),
        keep_local_state=not getattr(args, "reset_local_state", False),
        server_lr=getattr(args, "server_lr", None),
        ray_address=getattr(args, "ray_address", None),
    )


def _mode(args: argparse.Namespace) -> str:
    if args.command == "centralized":
        return "centralized"
    return "local-only" if args.local_only else "federated"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hermes-sim``; returns the exit code (2 for bad arguments, 1 for a failed run)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "compare":
            runs = load_runs(args.runs)
            print(format_comparison(runs))
            out = write_comparison(runs, args.out or runs[0].run_dir / COMPARE_PNG)
            curves = write_curves(runs, out.with_name(COMPARE_CURVES_PNG))
            print(f"\nbar plot: {out}\nvalidation Dice curves: {curves}")
            return 0
        if getattr(args, "ray_address", None) and _mode(args) != "federated":
            raise ValueError("--ray-address runs the federated simulation on a Ray cluster; --local-only uses no Ray")
        result = run_mode(_mode(args), _options(args))
    except ValueError as exc:
        print(f"hermes-sim: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"hermes-sim: run failed: {exc}", file=sys.stderr)
        return 1
    print()
    print(describe(result))
    print("\nfiles: " + ", ".join(p.name for p in result.files) + f" (in {result.run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
