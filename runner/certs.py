"""The runner's TLS certificate: generated once, kept, identified by its fingerprint."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

logger = logging.getLogger("didomagic.runner")

CERT_NAME = "runner-cert.pem"
KEY_NAME = "runner-key.pem"


def fingerprint_pem(pem: bytes) -> str:
    """SHA-256 fingerprint (lower-case hex) of a PEM certificate's DER bytes."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def fingerprint_file(certfile: Path) -> str:
    """SHA-256 fingerprint of the first certificate in a PEM file."""
    return fingerprint_pem(certfile.read_bytes())


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def generate(out_dir: Path, hosts: list[str], days: int = 3650) -> tuple[Path, Path, str]:
    """Write a self-signed certificate and its key into ``out_dir``.

    The certificate names ``hosts`` plus localhost and the loopback addresses,
    and is its own CA, so a client can use it as the only trust anchor.
    Returns ``(certfile, keyfile, fingerprint)``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"didomagic runner {hosts[0]}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(_names([*hosts, "localhost", "127.0.0.1", "::1"])),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = out_dir / CERT_NAME, out_dir / KEY_NAME
    _write_key(keyfile, key)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    certfile.write_bytes(cert_pem)
    return certfile, keyfile, fingerprint_pem(cert_pem)


def ensure(state_dir: Path, host: str) -> tuple[Path, Path]:
    """The certificate and key kept in ``state_dir``, generated on first use."""
    certfile, keyfile = state_dir / CERT_NAME, state_dir / KEY_NAME
    if not (certfile.exists() and keyfile.exists()):
        generate(state_dir, [host])
        logger.info("generated a self-signed certificate in %s", state_dir)
    return certfile, keyfile


def server_context(certfile: Path, keyfile: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with ``client_ca``, clients must present a cert it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
    return context


CA_CERT_NAME = "client-ca-cert.pem"
CA_KEY_NAME = "client-ca-key.pem"


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(pem)


def issue_client_cert(ca_dir: Path, name: str, out_dir: Path, days: int = 365) -> tuple[Path, Path]:
    """Sign a client certificate for ``name`` with the CA in ``ca_dir`` (made on first use).

    Returns ``(certfile, keyfile)`` in ``out_dir``. Give ``ca_dir/client-ca-cert.pem``
    to the runner's ``--client-ca``; give the pair to the client.
    """
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert_path, ca_key_path = ca_dir / CA_CERT_NAME, ca_dir / CA_KEY_NAME
    now = datetime.datetime.now(datetime.UTC)
    if not ca_cert_path.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "didomagic client CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(ca_key_path, ca_key)
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    certfile, keyfile = out_dir / f"{name}-cert.pem", out_dir / f"{name}-key.pem"
    _write_key(keyfile, key)
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return certfile, keyfile
