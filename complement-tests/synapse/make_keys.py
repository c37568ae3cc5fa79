"""Writes a self-signed TLS certificate and key for 127.0.0.1 and an ed25519
Matrix signing key, for one Synapse started by complement-tests/src/synapse.rs.
Runs with the Synapse virtualenv's Python (cryptography and signedjson come with
Synapse).

Usage: make_keys.py CERT_PATH TLS_KEY_PATH SIGNING_KEY_PATH
"""

import datetime
import ipaddress
import secrets
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from signedjson.key import generate_signing_key, write_signing_keys

cert_path, tls_key_path, signing_key_path = sys.argv[1:4]

key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (
    x509.CertificateBuilder()
    .subject_name(name)
    .issuer_name(name)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(days=1))
    .not_valid_after(now + datetime.timedelta(days=30))
    .add_extension(
        x509.SubjectAlternativeName(
            [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost"),
            ]
        ),
        critical=False,
    )
    .sign(key, hashes.SHA256())
)
with open(cert_path, "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
with open(tls_key_path, "wb") as f:
    f.write(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
with open(signing_key_path, "w") as f:
    write_signing_keys(f, [generate_signing_key("a_" + secrets.token_hex(2))])
