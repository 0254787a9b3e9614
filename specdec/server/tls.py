"""TLS and mTLS credentials for the server and the clients, from PEM files checked up front.

gRPC takes any bytes as PEM and fails only later, with "Failed to bind to address" on the server.
So every file is read and parsed with Python's `ssl` first, and the private key is checked against
its certificate; a problem stops start-up with a message naming the file.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from specdec.errors import SpecdecError


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SpecdecError(f"{flag} {path}: cannot read it ({e.strerror or e})") from e


def _check_certificates(path: Path, flag: str) -> None:
    """`path` must hold at least one PEM certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError) as e:
        raise SpecdecError(f"{flag} {path}: not a PEM certificate ({e})") from e


def _check_key_pair(cert: Path, key: Path, cert_flag: str, key_flag: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or getattr(e, "reason", "") == "KEY_VALUES_MISMATCH":
            raise SpecdecError(f"{key_flag} {key}: not the private key of {cert_flag} {cert}") from e
        raise SpecdecError(f"{key_flag} {key}: not a PEM private key ({e})") from e


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS with this certificate and key; with `client_ca`, also require client certificates
    signed by it (mTLS)."""
    cert_pem, key_pem = _read(cert, "--tls-cert"), _read(key, "--tls-key")
    _check_certificates(cert, "--tls-cert")
    _check_key_pair(cert, key, "--tls-cert", "--tls-key")
    ca_pem = None
    if client_ca is not None:
        ca_pem = _read(client_ca, "--tls-client-ca")
        _check_certificates(client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=ca_pem is not None
    )


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """What a client verifies the server with (`ca`; None: the system's roots) and, for mTLS,
    presents itself (`cert` and `key`, both or neither)."""
    if (cert is None) != (key is None):
        raise SpecdecError("--tls-cert and --tls-key go together (a client certificate and its key)")
    ca_pem = None
    if ca is not None:
        ca_pem = _read(ca, "--tls-ca")
        _check_certificates(ca, "--tls-ca")
    cert_pem = key_pem = None
    if cert is not None and key is not None:
        cert_pem, key_pem = _read(cert, "--tls-cert"), _read(key, "--tls-key")
        _check_certificates(cert, "--tls-cert")
        _check_key_pair(cert, key, "--tls-cert", "--tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
