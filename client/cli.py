"""``hermes-client``: the site's command line.

Subcommands:
    preprocess --site FILE.yaml [--workers N] [--plans FILE] [--no-progress]
        Validate the site config (all problems at once), preprocess every case (resumable) with the plan
        (``--plans``, else the last one received from the federation, else the recipe's), print the
        summary. Exit status: 0 all cases done or up to date, 1 some case failed, 2 invalid config.
    start --site FILE.yaml --server HOST:PORT [--insecure] [--root-certificates CA.crt]
          [--auth-key KEY] [--port 9094] [--log FILE] [--no-restart] [--max-restarts 10]
          [--restart-window 3600] [--restart-delay 5] [--max-restart-delay 60]
        Start this site's Flower SuperNode (``flower-supernode``) connected to the server's SuperLink and
        supervise it until Ctrl-C or SIGTERM: it runs the site's ClientApp whenever the server sends work;
        its output is shown (and appended to --log); when it dies, one line says what died and why, and
        it is restarted after 5, 10, 20, 40, 60, 60... s (at most --max-restarts within --restart-window
        seconds); refused activations, missing TLS and unreachable servers are explained. Root certificate
        and auth key come from the site config (``root_certificates``, ``auth_private_key``) unless given.
        Exit status: 0 stopped on request, 2 invalid config or arguments, else that of the last SuperNode
        when supervision ends (128 + N when killed by signal N; 1 when it stopped by itself).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from client.config import SiteConfig, load_site_config
from hermes_model.catalog import Catalog

if TYPE_CHECKING:
    from hermes_model.plans import Plans

EXIT_OK, EXIT_CASES_FAILED, EXIT_CONFIG = 0, 1, 2


def _preprocess(args: argparse.Namespace) -> int:
    from client.preprocess import preprocess_site  # heavy imports (SimpleITK, torch) only when needed

    try:
        catalog = Catalog.load()
        config = load_site_config(args.site, catalog=catalog)
    except ValueError as exc:  # SiteConfigError, or an invalid task catalog
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        plans, source = site_plans(config, args.plans)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"plan ({source}): {plans.describe()}")
    report = preprocess_site(config, plans, workers=args.workers, progress=not args.no_progress, catalog=catalog)
    print(report.summary())
    print(f"report: {config.preprocessed_dir / 'report.json'}")
    return EXIT_OK if report.ok else EXIT_CASES_FAILED


def site_plans(config: SiteConfig, plans_file: str | None) -> tuple[Plans, str]:
    """The plan a standalone ``preprocess`` uses, and where it came from: ``--plans`` (a ``plans.json`` or a
    model checkpoint), else the last plan this site received from a federation, else the recipe's."""
    from hermes_model.plans import Plans
    from hermes_model.trained import PLANS_KEY

    if plans_file is not None:
        path = Path(plans_file)
        if not path.is_file():
            raise ValueError(f"--plans {path}: no such file")
        if path.suffix == ".json":
            return Plans.from_json(path.read_text(encoding="utf-8")), str(path)
        from hermes_model.factory import load_checkpoint

        extra = load_checkpoint(path).extra
        if PLANS_KEY not in extra:
            raise ValueError(f"--plans {path}: the checkpoint carries no plans record")
        return Plans.from_dict(extra[PLANS_KEY]), f"the plan of model {path.name}"
    received = config.work_dir / "plans.json"
    if received.is_file():
        return Plans.from_json(received.read_text(encoding="utf-8")), f"last received from the federation, {received}"
    return Plans(), "the recipe's: no federation plan received yet"


def _start(args: argparse.Namespace) -> int:
    from client.launch import RestartPolicy, supervise_supernode

    try:
        policy = RestartPolicy(enabled=args.restart, max_restarts=args.max_restarts, window_s=args.restart_window,
                               initial_delay_s=args.restart_delay, max_delay_s=args.max_restart_delay)
        supervisor = supervise_supernode(args.site, args.server, insecure=args.insecure,
                                         root_certificates=args.root_certificates, auth_private_key=args.auth_key,
                                         port=args.port, log_path=args.log, policy=policy)
    except ValueError as exc:  # SiteConfigError, bad address, missing key files, bad restart options
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return supervisor.run()


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-parser per subcommand)."""
    parser = argparse.ArgumentParser(prog="hermes-client", description="Federated Hermes: site commands.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("preprocess", help="preprocess the site's datasets into training arrays")
    pre.add_argument("--site", required=True, help="site config YAML file")
    pre.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument("--plans", default=None, metavar="FILE",
                     help="the plan to preprocess with: a plans.json or a model checkpoint (default: the last plan "
                          "this site received from a federation, else the recipe's 1.5 mm / 128^3)")
    pre.set_defaults(func=_preprocess)
    start = sub.add_parser("start", help="start this site's Flower SuperNode (runs the ClientApp)")
    start.add_argument("--site", required=True, help="site config YAML file")
    start.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's SuperLink address")
    start.add_argument("--insecure", action="store_true", help="no TLS (only against an insecure SuperLink)")
    start.add_argument("--root-certificates", default=None, metavar="CA.crt",
                       help="the federation's CA certificate (default: root_certificates of the site config)")
    start.add_argument("--auth-key", default=None, metavar="KEY",
                       help="the site's private key for SuperNode authentication (default: auth_private_key "
                            "of the site config; none: no authentication)")
    start.add_argument("--port", type=_port, default=9094,
                       help="ClientApp runtime API port of this SuperNode (default 9094; one per SuperNode "
                            "on a host)")
    start.add_argument("--log", default=None, metavar="FILE",
                       help="also append the SuperNode's output and the supervisor's messages to FILE")
    start.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True,
                       help="restart the SuperNode when it stops without being asked to (default: on)")
    start.add_argument("--max-restarts", type=_count, default=10, metavar="N",
                       help="give up after N restarts within --restart-window seconds (default 10)")
    start.add_argument("--restart-window", type=_seconds, default=3600.0, metavar="SECONDS",
                       help="the window of --max-restarts (default 3600)")
    start.add_argument("--restart-delay", type=_seconds, default=5.0, metavar="SECONDS",
                       help="wait before the first restart, doubled after each failure in a row (default 5)")
    start.add_argument("--max-restart-delay", type=_seconds, default=60.0, metavar="SECONDS",
                       help="the longest wait between restarts (default 60)")
    start.set_defaults(func=_start)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hermes-client``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
