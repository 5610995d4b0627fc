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
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:
        f.write(key_pem)
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


def server_context(certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """A TLS 1.2+ server context for the runner."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context
