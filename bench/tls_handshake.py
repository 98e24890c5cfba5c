"""TLS handshake cost on the relay's side: RSA-2048 vs ECDSA P-256, full vs resumed.

Client and server run in one process over memory BIOs (no sockets, no event loop), with
the relay's own server context (`build_tls_context`), so the figures are the CPU the
relay spends in OpenSSL per handshake. The server's share is timed alone (the calls of its
``do_handshake``), and process CPU time is used, so other load on the machine inflates
them only a little.

    .venv/bin/python bench/tls_handshake.py [--handshakes 300]
"""

from __future__ import annotations

import argparse
import datetime
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from mailrelay.relay.server import build_tls_context

KeyType = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _self_signed(directory: Path, name: str, key: KeyType) -> tuple[Path, Path]:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("relay.bench")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    data = src.read()
    if data:
        dst.write(data)


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[float, ssl.SSLSession | None, bool]:
    """One handshake: (server CPU seconds, the client's session, resumed?)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="relay.bench", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    spent = 0.0
    client_done = server_done = False
    while not (client_done and server_done):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        _pump(c_out, s_in)
        if not server_done:
            started = time.process_time()
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            spent += time.process_time() - started
        _pump(s_out, c_in)
    # One record each way, so TLS 1.3 tickets reach the client (as an SMTP reply would).
    started = time.process_time()
    server.write(b"250 ok\r\n")
    spent += time.process_time() - started
    _pump(s_out, c_in)
    client.read(64)
    return spent, client.session, client.session_reused


def measure(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, count: int) -> dict[str, float]:
    full = [handshake(server_ctx, client_ctx, None)[0] for _ in range(count)]
    _, session, _ = handshake(server_ctx, client_ctx, None)
    resumed: list[float] = []
    for _ in range(count):
        spent, session, reused = handshake(server_ctx, client_ctx, session)
        assert reused, "resumption did not happen"
        resumed.append(spent)
    return {"full": statistics.median(full), "resumed": statistics.median(resumed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--handshakes", type=int, default=300)
    args = parser.parse_args()
    keys: dict[str, KeyType] = {
        "RSA-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ECDSA P-256": ec.generate_private_key(ec.SECP256R1()),
    }
    print(f"Server CPU per handshake (median of {args.handshakes}), {ssl.OPENSSL_VERSION}")
    print(f"{'certificate':<14}{'TLS':<6}{'full ms':>9}{'resumed ms':>12}{'full/s/core':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, key in keys.items():
            cert_file, key_file = _self_signed(Path(tmp), name.split()[0], key)
            for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
                server_ctx = build_tls_context(str(cert_file), str(key_file))
                client_ctx = ssl.create_default_context(cafile=str(cert_file))
                client_ctx.maximum_version = version
                result = measure(server_ctx, client_ctx, args.handshakes)
                label = "1.3" if version is ssl.TLSVersion.TLSv1_3 else "1.2"
                print(
                    f"{name:<14}{label:<6}{result['full'] * 1e3:>9.2f}"
                    f"{result['resumed'] * 1e3:>12.2f}{1 / result['full']:>13.0f}"
                )


if __name__ == "__main__":
    main()
