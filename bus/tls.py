"""Throwaway TLS certificates for tests and `cplane up --tls`: a private CA, a server
certificate for the loopback addresses, and a client certificate, all signed by it.

Not a PKI: the CA's key is never written, so nothing else can be signed by it
later; make new ones instead. Every file is written 0600. EC P-256 keys (fast to make; nats-server
and Python's ssl both take them).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of the PEM files `make_certs` wrote."""

    ca: str  # the CA certificate: clients verify the server with it (--tls-ca)
    server_cert: str
    server_key: str
    client_cert: str  # for a server that verifies clients (--tls-cert / --tls-key)
    client_key: str


def _write(path: Path, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return str(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           issuer_key: ec.EllipticCurvePrivateKey, days: int, *, ca: bool = False,
           usage: Sequence[x509.ObjectIdentifier] = (),
           hosts: Sequence[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # clocks a little apart
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
            content_commitment=False, data_encipherment=False, key_agreement=True,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certs(directory: str | Path, *, hosts: Sequence[str] = DEFAULT_HOSTS,
               days: int = 30) -> TlsFiles:
    """Write a fresh CA, a server certificate for `hosts` (IP and DNS SANs; by default
    127.0.0.1, ::1 and localhost) and a client certificate into `directory` (created
    0700 if missing); every file 0600."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cplane throwaway CA")])
    ca_cert = _issue("cplane throwaway CA", ca_key, ca_name, ca_key, days, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    # serverAuth and clientAuth: a cluster node dials its routes with the same certificate
    server_cert = _issue("cplane nats-server", server_key, ca_name, ca_key, days,
                         usage=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
                         hosts=hosts)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue("cplane client", client_key, ca_name, ca_key, days,
                         usage=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    return TlsFiles(
        ca=_write(d / "ca.pem", _cert_pem(ca_cert)),
        server_cert=_write(d / "server-cert.pem", _cert_pem(server_cert)),
        server_key=_write(d / "server-key.pem", _key_pem(server_key)),
        client_cert=_write(d / "client-cert.pem", _cert_pem(client_cert)),
        client_key=_write(d / "client-key.pem", _key_pem(client_key)),
    )


__all__ = ["DEFAULT_HOSTS", "TlsFiles", "make_certs"]
