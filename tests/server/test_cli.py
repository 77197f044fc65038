"""hermes-server keys: CA, server certificate with the right SANs, P-384 OpenSSH key pairs per site."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.cli import main, write_keys


def test_keys_writes_a_ca_a_server_cert_and_site_keys(tmp_path):
    assert (
        main(
            [
                "keys",
                "--out",
                str(tmp_path),
                "--site",
                "site-a",
                "--site",
                "site-b",
                "--host",
                "hermes.example.org",
                "--host",
                "10.0.0.5",
            ]
        )
        == 0
    )
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "hermes.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
    }
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for site in ("site-a", "site-b"):
        key = serialization.load_ssh_private_key((tmp_path / "sites" / site).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = (tmp_path / "sites" / f"{site}.pub").read_bytes()
        assert public.startswith(b"ecdsa-sha2-nistp384 ")
        assert serialization.load_ssh_public_key(public).public_numbers() == key.public_key().public_numbers()
        assert stat.S_IMODE((tmp_path / "sites" / site).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600


def test_keys_refuses_to_overwrite_and_bad_names(tmp_path):
    write_keys(tmp_path, ["site-a"])
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(ValueError, match="--force"):
        write_keys(tmp_path, ["site-a"])
    assert (tmp_path / "ca.crt").read_bytes() == before
    write_keys(tmp_path, ["site-a"], force=True)
    assert (tmp_path / "ca.crt").read_bytes() != before
    with pytest.raises(ValueError, match="--site"):
        write_keys(tmp_path / "other", ["bad/name"])
    assert main(["keys", "--out", str(tmp_path), "--site", "site-a"]) == 2
