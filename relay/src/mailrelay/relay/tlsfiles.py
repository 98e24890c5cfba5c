"""Check a listener's certificate and key before use, and say in words what is wrong.

OpenSSL's own errors (`[X509: KEY_VALUES_MISMATCH] key values mismatch`, `[Errno 2] No
such file or directory`) name neither file. `tls_problem` names the file at fault, or
both when they do not belong together. It never quotes the files' content.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["tls_problem"]


def _read(path: Path, what: str) -> tuple[bytes | None, str | None]:
    try:
        return path.read_bytes(), None
    except OSError as exc:
        return None, f"cannot read the TLS {what} file {path}: {exc.strerror or exc}"


def tls_problem(cert_file: Path, key_file: Path) -> str | None:
    """Why the pair does not load as a server certificate and key; None if it does.

    Blocking (reads both files): call it in a worker thread from async code.
    """
    cert, cert_error = _read(cert_file, "certificate")
    key, key_error = _read(key_file, "key")
    problems = [p for p in (cert_error, key_error) if p is not None]
    if cert is not None and b"-----BEGIN CERTIFICATE-----" not in cert:
        problems.append(f"the TLS certificate file {cert_file} holds no PEM certificate")
    if key is not None and b"PRIVATE KEY-----" not in key:
        problems.append(f"the TLS key file {key_file} holds no PEM private key")
    elif key is not None and b"ENCRYPTED" in key:
        problems.append(
            f"the TLS key file {key_file} is encrypted with a passphrase; the relay needs an "
            "unencrypted key (a kubernetes.io/tls Secret holds one)"
        )
    if problems:
        return "; ".join(problems)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password: an encrypted key fails instead of prompting on a terminal.
        context.load_cert_chain(str(cert_file), str(key_file), password=b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return (
                f"the TLS key in {key_file} does not belong to the certificate in {cert_file}; "
                "use the key the certificate was issued for"
            )
        reason = (exc.reason or "unknown error").replace("_", " ").lower()
        return f"the TLS certificate {cert_file} and key {key_file} do not load: {reason}"
    except OSError as exc:
        return f"the TLS certificate {cert_file} and key {key_file} do not load: {exc.strerror}"
    return None
