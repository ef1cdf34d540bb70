"""TLS for both planes: the pool's certificate authority, the certificates it issues, and the
``ssl`` contexts the data plane uses (gRPC edges build their credentials from the same files).

Every daemon and client of a pool holds a certificate signed by the pool's CA (``nvpool certs``).
Connections are mutually authenticated: the metadata service accepts only clients and agents with a
pool certificate, agents accept control calls only over such connections (and, in addition, only
with the metadata service's credential, ``proto/capability.py``), and, when the data plane is
encrypted, only pool clients reach an agent's data port. Peers are verified against the pool's CA,
not by host name (agents are dialled by address; every pool certificate also names ``SERVER_NAME``):
a certificate from the pool's CA is the credential. Each certificate records its role (``meta``,
``agent``, ``client``) in a URI subject alternative name, ``nvpool:ROLE:NAME``.

Keys are EC P-256; certificates live ``DAYS`` days (re-issue and restart to rotate; the CA key stays
on the machine that issues, never on storage servers).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nvpool.proto.errors import UsageError

#: the name every pool certificate carries, and the one clients verify
SERVER_NAME = "nvpool-pool"
DAYS = 825
ROLES = ("meta", "agent", "client")


@dataclass(frozen=True)
class TlsFiles:
    """A party's TLS material: the pool CA, its certificate and its key (PEM files)."""

    ca: str
    cert: str
    key: str

    @staticmethod
    def from_dir(directory: str, name: str) -> "TlsFiles":
        d = Path(directory)
        return TlsFiles(str(d / "ca.pem"), str(d / f"{name}.pem"), str(d / f"{name}.key"))

    def check(self) -> "TlsFiles":
        for what, path in (("CA certificate", self.ca), ("certificate", self.cert), ("key", self.key)):
            if not os.path.isfile(path):
                raise UsageError(f"TLS {what} {path} does not exist (nvpool certs init / issue make them)")
        return self

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(CA, certificate, key) as PEM bytes."""
        self.check()
        return Path(self.ca).read_bytes(), Path(self.cert).read_bytes(), Path(self.key).read_bytes()

    def server_context(self) -> ssl.SSLContext:
        """A TLS server that requires a certificate from the pool's CA."""
        self.check()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A TLS client that presents its certificate and accepts only servers of the pool's CA."""
        self.check()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(self.ca)
        ctx.check_hostname = True  # against SERVER_NAME, which every pool certificate carries
        return ctx


def tls_files(ca: str, cert: str, key: str) -> Optional[TlsFiles]:
    """``TlsFiles`` from a daemon's three options (None when none is set; all three or none)."""
    if not (ca or cert or key):
        return None
    if not (ca and cert and key):
        raise UsageError("TLS needs all three of tls_ca, tls_cert and tls_key (or none)")
    return TlsFiles(ca, cert, key).check()


def from_env() -> Optional[TlsFiles]:
    """A client's TLS files from ``$NVPOOL_TLS`` (a directory with ca.pem, client.pem, client.key)."""
    d = os.environ.get("NVPOOL_TLS", "")
    return TlsFiles.from_dir(d, "client") if d else None


# ---------------------------------------------------------------------- issuing (cryptography)
def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init_ca(directory: str, pool: str = "nvpool") -> None:
    """Create the pool's CA in ``directory`` (ca.pem, ca.key) unless it exists."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = Path(directory)
    if (d / "ca.pem").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{pool} CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(d / "ca.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue(directory: str, name: str, role: str, hosts: tuple[str, ...] = ()) -> TlsFiles:
    """Issue ``NAME.pem`` / ``NAME.key`` in ``directory``, signed by its CA, for ``role``; ``hosts``
    (names or addresses) are added to the certificate's names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if role not in ROLES:
        raise UsageError(f"unknown role {role!r} ({', '.join(ROLES)})")
    d = Path(directory)
    try:
        ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
        ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    except OSError as exc:
        raise UsageError(f"no pool CA in {directory} (nvpool certs init first): {exc.strerror or exc}") from None
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME), x509.UniformResourceIdentifier(f"nvpool:{role}:{name}")]
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_private(d / f"{name}.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TlsFiles.from_dir(directory, name)
