"""``hermes-server``: ``keys`` (CA, server certificate, one P-384 OpenSSH key pair per site), ``start`` and
``report``.

``start --config server.yaml`` starts ``flower-superlink`` (TLS with the files of ``keys`` unless
``--insecure``; ``--enable-supernode-auth`` registers every site public key; ``--database`` keeps its
state), submits the federated run with ``flwr run`` (the run config is the server yaml), streams the
run's logs and stops the SuperLink by PID when the run ends or on Ctrl-C (see ``server.launch``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hermes_model.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# ----------------------------------------------------------------------------------------------- keys
def make_ca(
    common_name: str = "hermes-fl CA", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed P-384 certificate authority."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str], days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A SuperLink certificate signed by the CA, valid for ``localhost``, ``127.0.0.1`` and ``hosts``."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*DEFAULT_HOSTS, *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
                raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hermes-fl superlink")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_key() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) of a new P-384 key pair (SuperNode authentication)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_keys(
    out_dir: str | Path, sites: Sequence[str], hosts: Sequence[str] = (), force: bool = False
) -> dict[str, Path]:
    """Write ``ca.crt``/``ca.key``, ``server.crt``/``server.key`` and ``sites/<site>`` + ``.pub`` under
    ``out_dir`` (private keys mode 0600). Returns name -> path.

    Raises:
        ValueError: a bad site name, or files exist and ``force`` is False.
    """
    bad = [s for s in sites if not _SITE_NAME.match(s)]
    if bad or len(set(sites)) != len(sites):
        raise ValueError(
            f"--site names must be unique and consist of letters, digits, '_' and '-', got {list(sites)}"
        )
    out = Path(out_dir)
    targets = {
        "ca.crt": out / "ca.crt",
        "ca.key": out / "ca.key",
        "server.crt": out / "server.crt",
        "server.key": out / "server.key",
    }
    for site in sites:
        targets[site] = out / "sites" / site
        targets[f"{site}.pub"] = out / "sites" / f"{site}.pub"
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not force:
        raise ValueError(f"key files already exist (pass --force to replace them): {existing[:4]}")
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts)
    pem = serialization.Encoding.PEM
    _write(targets["ca.crt"], ca_cert.public_bytes(pem), private=False)
    _write(targets["ca.key"], _pkcs8(ca_key), private=True)
    _write(targets["server.crt"], server_cert.public_bytes(pem), private=False)
    _write(targets["server.key"], _pkcs8(server_key), private=True)
    for site in sites:
        private, public = make_site_key()
        _write(targets[site], private, private=True)
        _write(targets[f"{site}.pub"], public, private=False)
    return targets


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool) -> None:
    atomic_write_bytes(path, data)  # the temp file is created 0600 and renamed
    path.chmod(0o600 if private else 0o644)


# ----------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hermes-server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="make a CA, the SuperLink certificate and one key pair per site")
    keys.add_argument("--out", required=True, help="output folder")
    keys.add_argument("--site", action="append", default=[], help="site name (repeat for each site)")
    keys.add_argument("--host", action="append", default=[], help="extra host name or IP the sites dial")
    keys.add_argument("--force", action="store_true", help="replace existing files")
    start = sub.add_parser("start", help="start the SuperLink, submit the run, follow it, stop the SuperLink")
    start.add_argument("--config", required=True,
                       help="server yaml (run-config keys; relative paths are relative to its folder)")
    start.add_argument("--resume", action="store_true", help="continue the run in run-dir")
    start.add_argument("--keys", default=None, metavar="DIR",
                       help="output folder of 'hermes-server keys' (default: keys/ beside the server yaml)")
    start.add_argument("--insecure", action="store_true", help="no TLS (trusted test networks only)")
    start.add_argument("--enable-supernode-auth", action="store_true",
                       help="admit only SuperNodes whose public key is registered (needs TLS)")
    start.add_argument("--site-key", action="append", default=[], metavar="SITE.pub",
                       help="a site public key to register, named after the file (repeat; default with "
                            "--enable-supernode-auth: every KEYS/sites/*.pub)")
    start.add_argument("--host", default="127.0.0.1",
                       help="address to serve on (default 127.0.0.1; 0.0.0.0 for remote sites)")
    start.add_argument("--port", type=int, default=8000, help="the SuperLink's one port (default 8000)")
    start.add_argument("--database", default=None, metavar="FILE.db",
                       help="SQLite file of the SuperLink's state (default: in memory)")
    start.add_argument("--no-stream", action="store_true", help="do not stream the run's logs")
    report = sub.add_parser(
        "report", help="prior-bank report of a run: prior similarity heatmaps, ownership, metric curves"
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the server's run directory")
    report.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    report.add_argument("--round", type=int, default=None, help="round checkpoint to read (default: latest)")
    report.add_argument("--all-rows", action="store_true", help="every prior row, not only the trained ones")
    report.add_argument("--per-layer", action="store_true", help="also one heatmap per fusion layer")
    return parser


def _report(args: argparse.Namespace) -> int:
    from server.report import format_ownership, write_report

    files = write_report(
        args.run_dir, args.out, server_round=args.round, all_rows=args.all_rows, per_layer=args.per_layer
    )
    print(f"prior bank of round {files.server_round}:")
    print(format_ownership(files.ownership))
    print("files written:")
    for path in files.files:
        print(f"  {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "keys":
            paths = write_keys(args.out, args.site, args.host, args.force)
            for name, path in paths.items():
                print(f"{name}: {path}")
            return 0
        if args.command == "report":
            return _report(args)
        return _start(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _start(args: argparse.Namespace) -> int:
    from server.app import read_run_status
    from server.config import ServerConfig
    from server.launch import STATUS_COMPLETED, LaunchError, LaunchOptions, launch, resolve_config_paths
    from server.runner import usage_lines

    config_path = Path(args.config).resolve()
    config = ServerConfig.from_yaml(config_path, **({"resume": True} if args.resume else {}))
    config = resolve_config_paths(config, config_path.parent)
    keys = None if args.insecure else Path(args.keys or config_path.parent / "keys").resolve()
    options = LaunchOptions(
        keys_dir=keys,
        supernode_auth=args.enable_supernode_auth,
        site_keys=tuple(Path(k).resolve() for k in args.site_key),
        host=args.host,
        port=args.port,
        database=Path(args.database).resolve() if args.database else None,
        stream_logs=not args.no_stream,
    )
    try:
        info = launch(config, options)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the run was stopped and the SuperLink shut down", file=sys.stderr)
        return 130
    status = info.get("status")
    outcome = read_run_status(config.run_dir)
    print(json.dumps({"run-id": info.get("run-id"), "status": status, "details": info.get("status-details"),
                      "run-dir": config.run_dir, "federation": outcome}))
    if outcome.get("status") == "failed":
        print(f"the federation stopped: {outcome.get('reason')}", file=sys.stderr)
        return 1
    if status != STATUS_COMPLETED:
        return 1
    if outcome.get("final_model"):
        for line in usage_lines(Path(outcome["final_model"]), config.run_dir):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
