"""Certificates and keys with ``cryptography``: the consortium CA, the SuperLink's TLS
certificate, and SuperNode authentication keys (EC P-384, OpenSSH format, as
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read them).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedhealth.errors import CryptoError

CURVE = ec.SECP384R1()


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` created with mode 0600 (owner only); never overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def write_public(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` with mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedhealth consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(common_name: str, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed consortium CA.

    Returns
    -------
    tuple[bytes, bytes]
        The CA certificate (PEM) and its private key (PEM, unencrypted).
    """
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_server_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, hosts: list[str], days: int = 825
) -> tuple[bytes, bytes]:
    """A TLS server certificate signed by the CA, valid for ``hosts`` (IPs or DNS names).

    Returns
    -------
    tuple[bytes, bytes]
        The certificate (PEM) and its private key (PEM, unencrypted).
    """
    if not hosts:
        raise CryptoError("a server certificate needs at least one host name or IP address")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_node_keypair() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair (EC P-384).

    Returns
    -------
    tuple[bytes, bytes]
        The private key (OpenSSH PEM, read by ``flower-supernode``) and the public
        key (one OpenSSH line, read by ``flwr supernode register``).
    """
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def cert_hosts(cert_pem: bytes) -> list[str]:
    """The host names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + list(
        san.get_values_for_type(x509.DNSName)
    )
