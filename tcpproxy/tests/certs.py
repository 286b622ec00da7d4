"""
Test certificates, made at test time with C{cryptography}: a CA, server
certificates for different names, a client certificate, an expired one, a
chain through an intermediate CA, and a second CA nobody trusts.

Keys are EC (P-256): quick to generate.  The set is made once per process
(L{pki}) and written as PEM files into a test's own folder (L{writePKI}).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ALPHA = "alpha.test"
BETA = "beta.test"
GAMMA = "gamma.test"
"""
The names the server certificates are for: C{alpha} (also C{localhost} and
127.0.0.1, the default certificate), C{beta}, and C{gamma} (issued by the
intermediate CA, served with its chain).
"""


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    subject: str,
    issuer: tuple | None,
    names: list[str] = (),
    ca: bool = False,
    client: bool = False,
    expired: bool = False,
) -> tuple:
    """
    A key and a certificate for C{subject}, signed by C{issuer} (key,
    certificate) or by itself.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:
        notBefore, notAfter = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    else:
        notBefore, notAfter = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    issuerKey, issuerCert = issuer if issuer else (key, None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuerCert.subject if issuerCert else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if issuerCert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuerKey.public_key()), critical=False
        )
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    return key, builder.sign(issuerKey, hashes.SHA256())


def _certPEM(*certificates) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _keyPEM(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@lru_cache(maxsize=1)
def pki() -> dict[str, bytes]:
    """
    File name to PEM content, for the whole set:

      - C{ca.pem}: the CA everything below is issued by (but C{gamma},
        issued by C{intermediate.pem}, itself issued by the CA).
      - C{alpha.pem}/C{.key}, C{beta.pem}/C{.key}: server certificates.
      - C{gamma-chain.pem}/C{gamma.key}: leaf and intermediate in one file.
      - C{client.pem}/C{.key}: a client certificate.
      - C{expired.pem}/C{.key}: a server certificate for alpha, expired.
      - C{other-ca.pem}, C{other.pem}/C{.key}: another CA and a certificate
        for alpha it issued (a target the proxy must not trust).
    """
    ca = _issue("Test CA", None, ca=True)
    intermediate = _issue("Test Intermediate CA", ca, ca=True)
    other = _issue("Other CA", None, ca=True)
    files = {"ca.pem": _certPEM(ca[1]), "other-ca.pem": _certPEM(other[1])}
    for stem, issuer, names, extra in [
        ("alpha", ca, [ALPHA, "localhost", "127.0.0.1"], {}),
        ("beta", ca, [BETA], {}),
        ("client", ca, ["client.test"], {"client": True}),
        ("expired", ca, [ALPHA, "127.0.0.1"], {"expired": True}),
        ("other", other, [ALPHA, "127.0.0.1"], {}),
    ]:
        key, cert = _issue(stem, issuer, names, **extra)
        files[f"{stem}.pem"] = _certPEM(cert)
        files[f"{stem}.key"] = _keyPEM(key)
    key, cert = _issue("gamma", intermediate, [GAMMA])
    files["gamma-chain.pem"] = _certPEM(cert, intermediate[1])
    files["gamma.key"] = _keyPEM(key)
    return files


def writePKI(folder: str) -> str:
    """
    Write every file of L{pki} into C{folder} (made if needed); return it.
    """
    os.makedirs(folder, exist_ok=True)
    for name, content in pki().items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return folder


def certificateOf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)
