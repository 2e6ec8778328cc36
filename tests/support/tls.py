"""Throw-away X.509 material for TLS tests: a CA and server certificates it signs.

Everything is generated with the ``cryptography`` package (a test extra), written as PEM files
into a test's directory, and valid for a day. Keys are EC P-256: fast to generate, accepted by
mosquitto and by Python's ssl module alike.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.broker import Broker, BrokerError

_VALID_FOR = datetime.timedelta(days=1)


@dataclass(frozen=True)
class CA:
    """A self-signed certificate authority: ``cert_file`` is what clients trust."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_file: Path


@dataclass(frozen=True)
class ServerCert:
    """A server certificate and its key, as a broker's ``certfile``/``keyfile``."""

    cert_file: Path
    key_file: Path
    hosts: tuple[str, ...]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_ca(directory: Path, name: str = "routemqd-test-ca") -> CA:
    """A new CA whose certificate is written to ``<directory>/<name>.pem``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / f"{name}.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CA(name=name, cert=cert, key=key, cert_file=cert_file)


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue_server_cert(
    ca: CA,
    directory: Path,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    name: str = "server",
) -> ServerCert:
    """A server certificate for ``hosts`` (IP addresses and DNS names), signed by ``ca``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID_FOR)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_file = directory / f"{name}.crt"
    key_file = directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_file)
    return ServerCert(cert_file=cert_file, key_file=key_file, hosts=hosts)


def listener_config(port: int, server: ServerCert, ca: CA, host: str = "127.0.0.1") -> str:
    """Mosquitto lines for an extra TLS listener (for ``Broker(extra_config=...)``)."""
    return "\n".join(
        (
            f"listener {port} {host}",
            f"cafile {ca.cert_file}",
            f"certfile {server.cert_file}",
            f"keyfile {server.key_file}",
        )
    )


def start_broker(
    workdir: Path,
    tls_listeners: dict[str, tuple[ServerCert, CA]],
    extra_config: str = "",
    attempts: int = 5,
) -> tuple[Broker, dict[str, int]]:
    """Start a :class:`Broker` with its plain listener plus one TLS listener per entry.

    Returns the running broker and the port of each named TLS listener. The extra ports are
    picked free and retried as a whole when one was taken before mosquitto bound it.
    """
    last: BrokerError | None = None
    for _ in range(attempts):
        ports = {name: _free_port() for name in tls_listeners}
        lines = [extra_config.strip()] if extra_config.strip() else []
        lines += [
            listener_config(ports[name], server, ca) for name, (server, ca) in tls_listeners.items()
        ]
        broker = Broker(workdir=workdir, extra_config="\n".join(lines))
        try:
            broker.start()
        except BrokerError as e:
            last = e
            continue
        return broker, ports
    raise BrokerError(f"no broker with TLS listeners after {attempts} attempts: {last}")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


__all__ = [
    "CA",
    "ServerCert",
    "issue_server_cert",
    "listener_config",
    "make_ca",
    "start_broker",
]
