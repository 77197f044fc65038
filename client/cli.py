"""``hermes-client``: the site's command line.

Subcommands:
    preprocess --site FILE.yaml [--workers N] [--no-progress]
        Validate the site config (all problems at once), preprocess every case (resumable), print the
        summary. Exit status: 0 all cases done or up to date, 1 some case failed, 2 invalid config.
    start --site FILE.yaml --server HOST:PORT [--insecure] [--root-certificates CA.crt]
          [--auth-key KEY] [--port 9094]
        Start this site's Flower SuperNode (``flower-supernode``) connected to the server's SuperLink;
        it runs the site's ClientApp whenever the server sends work, until Ctrl-C. Root certificate and
        auth key come from the site config (``root_certificates``, ``auth_private_key``) unless given.
        Exit status: 0 stopped on request, 2 invalid config or arguments, else the SuperNode's status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from client.config import load_site_config
from hermes_model.catalog import Catalog

EXIT_OK, EXIT_CASES_FAILED, EXIT_CONFIG = 0, 1, 2


def _preprocess(args: argparse.Namespace) -> int:
    from client.preprocess import preprocess_site  # heavy imports (SimpleITK, torch) only when needed

    try:
        catalog = Catalog.load()
        config = load_site_config(args.site, catalog=catalog)
    except ValueError as exc:  # SiteConfigError, or an invalid task catalog
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    report = preprocess_site(config, workers=args.workers, progress=not args.no_progress, catalog=catalog)
    print(report.summary())
    print(f"report: {config.preprocessed_dir / 'report.json'}")
    return EXIT_OK if report.ok else EXIT_CASES_FAILED


def _start(args: argparse.Namespace) -> int:
    from client.launch import run_supernode, start_supernode

    try:
        handle = start_supernode(args.site, args.server, insecure=args.insecure,
                                 root_certificates=args.root_certificates, auth_private_key=args.auth_key,
                                 port=args.port)
    except ValueError as exc:  # SiteConfigError, bad address, missing key files
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return run_supernode(handle)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number in 1..65535, got {text!r}")
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
