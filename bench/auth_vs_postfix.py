"""Benchmark: authenticated submission (STARTTLS + AUTH PLAIN per session), relay vs Postfix.

What real apps do: connect, STARTTLS, AUTH PLAIN, send, QUIT, often one session per message.
Every scenario runs the same load from `bench/loadgen` (a small Go client, built once and
cached under ~/.cache/mailrelay; it reports its own CPU so it is visibly not the
bottleneck): `--concurrency` sessions in flight (default 20), each worker logging in as
its own user (20 users), `--msgs` messages of 2 KB per session.

Systems, each started fresh per scenario, forwarding to a fresh sink on loopback:

* ``postfix``: Debian's Postfix, a private instance like `relay_vs_postfix.py`'s (own
  config and fsync'd queue), plus STARTTLS with the same certificate (ECDSA P-256) and
  SASL through a private Dovecot auth service from Debian's `dovecot-core` (passwd-file,
  SHA512-CRYPT, Dovecot's default of no auth cache), relaying to `smtp-sink`;
* ``relay-cold``: our relay with the users file as docs/relay-config.md says (bcrypt,
  cost 12) and the AUTH cache off: every login pays bcrypt, as every first login does;
* ``relay-warm``: the same with the cache on (the default), warmed by one login per user
  before the measurement: repeated logins;
* ``relay-machine``: the same users as operator-generated machine credentials
  (`$mailrelay-hmac-sha256$`), cache on but not needed;
* ``relay-http``: relay-warm forwarding to a local Mailgun-compatible HTTP server
  (`loadgen mailgun`, keep-alive HTTP/1.1) instead of smtp-sink.

Reported per scenario: sessions/s and end-to-end messages/s (until the sink counted every
message), session latency p50/p99 as the client saw it, server CPU per message (the
process tree: for Postfix, its daemons plus Dovecot's), the peak memory of that tree, and
the generator's own CPU. `--profile-relay` runs the relay of the http scenario under
cProfile and prints where its time goes.

The machine this was written on is shared; take figures on a quiet one (`uptime`).

    .venv/bin/python bench/auth_vs_postfix.py --quick          # smoke: a few seconds each
    .venv/bin/python bench/auth_vs_postfix.py                  # full
    .venv/bin/python bench/auth_vs_postfix.py --scenarios relay-http --profile-relay
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A script's own folder is on sys.path: the sibling benchmark is importable as is.
import relay_vs_postfix as base

LOADGEN_DIR = Path(__file__).resolve().parent / "loadgen"
CACHE = Path.home() / ".cache" / "mailrelay"
USERS = 20
SCENARIOS = ("postfix", "relay-cold", "relay-warm", "relay-machine", "relay-http")
# Not run by default: the relay without AUTH, with and without STARTTLS (memory baselines).
EXTRA_SCENARIOS = ("relay-tls-noauth", "relay-plain")


def build_loadgen() -> Path:
    """The Go load generator, built once per source version into ~/.cache/mailrelay."""
    digest = hashlib.sha256()
    for name in ("go.mod", "main.go"):
        digest.update((LOADGEN_DIR / name).read_bytes())
    binary = CACHE / f"bench-loadgen-{digest.hexdigest()[:12]}" / "loadgen"
    if binary.is_file():
        return binary
    go = shutil.which("go") or "/usr/local/go/bin/go"
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    subprocess.run(
        [go, "build", "-o", str(tmp), "."],
        cwd=LOADGEN_DIR,
        check=True,
        env=dict(os.environ, GOFLAGS="-mod=mod", CGO_ENABLED="0"),
    )
    tmp.replace(binary)
    return binary


# --------------------------------------------------------------------------------------
# Credentials and certificates, shared by every system


@dataclass
class Material:
    """The certificate, the users and their files in each system's format."""

    root: Path
    ca_file: Path = field(init=False)
    cert_file: Path = field(init=False)
    key_file: Path = field(init=False)
    users: list[tuple[str, str]] = field(init=False)
    machine: list[tuple[str, str]] = field(init=False)

    def make(self) -> None:
        import bcrypt  # noqa: PLC0415  (the venv has it; the module docstring runs without)
        import trustme  # noqa: PLC0415

        from mailrelay.relay.machinehash import (  # noqa: PLC0415
            hash_machine_secret,
            new_machine_secret,
        )

        ca = trustme.CA()  # ECDSA P-256, as docs/relay-config.md recommends
        cert = ca.issue_cert("localhost")
        self.ca_file = self.root / "ca.pem"
        self.cert_file = self.root / "cert.pem"
        self.key_file = self.root / "key.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert.private_key_pem.write_to_path(str(self.key_file))
        with self.cert_file.open("wb") as out:
            for blob in cert.cert_chain_pems:
                out.write(blob.bytes())
        os.chmod(self.key_file, 0o644)  # Postfix's smtpd reads it as `postfix`
        self.users = [(f"user{i:02d}", secrets.token_urlsafe(12)) for i in range(USERS)]
        self.machine = [(f"app{i:02d}", new_machine_secret()) for i in range(USERS)]
        # bcrypt cost 12: what `bcrypt.gensalt()` in the docs' one-liner makes.
        lines = ["users:"]
        for name, password in self.users:
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(12)).decode()
            lines += [f"  - username: {name}", f'    password_hash: "{hashed}"']
        (self.root / "users.yaml").write_text("\n".join(lines) + "\n")
        for name, secret in self.machine:
            (self.root / f"{name}.hash").write_text(hash_machine_secret(secret))
        dovecot = []
        for name, password in self.users:
            crypted = subprocess.run(
                ["openssl", "passwd", "-6", "-stdin"],
                input=password,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            dovecot.append(f"{name}:{{SHA512-CRYPT}}{crypted}")
        (self.root / "dovecot-users").write_text("\n".join(dovecot) + "\n")
        os.chmod(self.root / "dovecot-users", 0o644)

    def logins_file(self, machine: bool) -> Path:
        path = self.root / ("machine-logins.txt" if machine else "logins.txt")
        pairs = self.machine if machine else self.users
        path.write_text("\n".join(f"{n} {p}" for n, p in pairs) + "\n")
        return path


# --------------------------------------------------------------------------------------
# Postfix + Dovecot


DOVECOT_CONF = """\
# Generated by bench/auth_vs_postfix.py: only the auth service, for Postfix's SASL.
base_dir = {root}/dovecot-run
state_dir = {root}/dovecot-state
log_path = {root}/dovecot.log
protocols =
ssl = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=SHA512-CRYPT {users}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  unix_listener {socket} {{
    mode = 0666
  }}
}}
"""

SASL_TLS_MAIN_CF = """
# STARTTLS and SASL (Dovecot), as a submission server for apps would have them.
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {socket}
smtpd_relay_restrictions = permit_sasl_authenticated, reject
mynetworks =
"""


class PostfixDovecot(base.PostfixServer):
    """A private Postfix with STARTTLS and SASL through a private Dovecot auth service."""

    def __init__(self, root: Path, port: int, sink_port: int, material: Material) -> None:
        postfix = base.find_tool("postfix")
        assert postfix is not None
        super().__init__(postfix, root, port, sink_port)
        self.label = "postfix+dovecot"
        self.material = material
        self.socket = root / "auth-socket"
        self.dovecot: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        for sub in ("etc", "queue", "data", "dovecot-run", "dovecot-state"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        conf = self.root / "dovecot.conf"
        conf.write_text(
            DOVECOT_CONF.format(
                root=self.root, users=self.material.root / "dovecot-users", socket=self.socket
            )
        )
        dovecot = base.find_tool("dovecot")
        assert dovecot is not None
        self.dovecot = await asyncio.create_subprocess_exec(
            dovecot, "-F", "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if time.monotonic() > deadline or self.dovecot.returncode is not None:
                raise base.BenchError(f"Dovecot made no {self.socket}\n{self._dovecot_log()}")
            await asyncio.sleep(0.05)
        os.chmod(self.root, 0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.root / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        main_cf = base.POSTFIX_MAIN_CF.format(root=self.root, sink_port=self.sink_port)
        main_cf = main_cf.replace("smtpd_tls_security_level = none\n", "")
        main_cf = main_cf.replace("smtpd_relay_restrictions = permit_mynetworks, reject\n", "")
        main_cf = main_cf.replace("mynetworks = 127.0.0.1/32\n", "")
        main_cf += SASL_TLS_MAIN_CF.format(
            cert=self.material.cert_file, key=self.material.key_file, socket=self.socket
        )
        (self.etc / "main.cf").write_text(main_cf)
        master_cf = base.POSTFIX_MASTER_CF.format(port=self.port)
        master_cf += "tlsmgr    unix  - - n 1000? 1 tlsmgr\n"  # TLS keys and ticket keys
        (self.etc / "master.cf").write_text(master_cf)
        await self._postfix("check")
        await self._postfix("start")
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self._master = int(pid_file.read_text().strip())
                break
            await asyncio.sleep(0.05)
        if self._master is None:
            raise base.BenchError(f"Postfix wrote no {pid_file}\n{self.log_tail()}")
        await base.wait_for_banner(self.port, 20)

    def _dovecot_log(self) -> str:
        return base.tail(self.root / "dovecot.log")

    def roots(self) -> list[int]:
        pids = [self.root_pid()]
        if self.dovecot is not None:
            pids.append(self.dovecot.pid)
        return pids

    async def stop(self) -> None:
        await super().stop()
        if self.dovecot is not None and self.dovecot.returncode is None:
            self.dovecot.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dovecot.wait(), 10)
            if self.dovecot.returncode is None:
                self.dovecot.kill()
                await self.dovecot.wait()


# --------------------------------------------------------------------------------------
# Our relay


class AuthRelay(base.RelayServer):
    """Our relay with STARTTLS, the users file, app credentials and the AUTH cache."""

    def __init__(
        self,
        python: str,
        root: Path,
        port: int,
        sink_port: int,
        material: Material,
        *,
        label: str,
        cache: bool,
        http: bool,
        profile: Path | None = None,
        workers: int = 1,
    ) -> None:
        options = base.RelayOptions(profile=profile, workers=workers)
        super().__init__(python, root, port, sink_port, options)
        self.label = label
        self.material = material
        self.cache = cache
        self.http = http
        self.tls = label != "relay-plain"
        self.auth = label not in ("relay-plain", "relay-tls-noauth")

    def config_text(self) -> str:
        config: dict[str, Any] = json.loads(super().config_text())
        m = self.material
        config["listener"]["tls"] = {"cert_file": str(m.cert_file), "key_file": str(m.key_file)}
        config["allowed_networks"] = []
        config["auth"] = {
            "required": True,
            "users_file": str(m.root / "users.yaml"),
            "cache": {"enabled": self.cache},
            "app_credentials": [
                {"username": name, "password_hash_file": str(m.root / f"{name}.hash")}
                for name, _ in m.machine
            ],
        }
        if not self.auth:
            config["allowed_networks"] = ["127.0.0.1/32"]
            config["auth"] = {"required": False}
        if not self.tls:
            del config["listener"]["tls"]
        if self.http:
            (self.root / "mailgun").mkdir(parents=True, exist_ok=True)
            (self.root / "mailgun" / "api_key").write_text("key-bench")
            config["routes"] = [
                {
                    "name": "all",
                    "upstream": {
                        "type": "api",
                        "name": "mailgun",
                        "provider": "mailgun",
                        "domain": "bench.example.com",
                        "endpoint": f"http://127.0.0.1:{self.sink_port}",
                        "credentials_dir": str(self.root / "mailgun"),
                        "concurrency": 16,
                        "insecure_allow_local_endpoint": True,  # the local sink
                    },
                }
            ]
        return json.dumps(config, indent=2)

    def roots(self) -> list[int]:
        return [self.root_pid()]


# --------------------------------------------------------------------------------------
# Sinks


class MailgunSink:
    """`loadgen mailgun`: a Mailgun-compatible messages.mime endpoint that counts."""

    def __init__(self, loadgen: Path, port: int) -> None:
        self.loadgen = loadgen
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            str(self.loadgen),
            "mailgun",
            "-addr",
            f"127.0.0.1:{self.port}",
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        await asyncio.wait_for(self.proc.stdout.readline(), 10)
        for _ in range(100):
            if await base.http_ok(self.port, "/count"):
                return
            await asyncio.sleep(0.05)
        raise base.BenchError("the Mailgun sink never answered")

    def count_now(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/count", timeout=5) as reply:
            return int(reply.read())

    async def wait_for(self, target: int, within: float) -> float | None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.count_now) >= target:
                return time.monotonic()
            await asyncio.sleep(0.02)
        return None

    @property
    def count(self) -> int:
        return self.count_now()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


# --------------------------------------------------------------------------------------
# One run


@dataclass
class Result:
    scenario: str
    msgs_per_session: int
    sessions: int = 0
    messages: int = 0
    failures: int = 0
    sessions_per_s: float = math.nan
    e2e_msgs_per_s: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    server_cpu_ms_per_msg: float = math.nan
    server_cores: float = math.nan
    peak_rss_mb: float = math.nan
    peak_pss_mb: float = math.nan
    loadgen_cpu_ms_per_session: float = math.nan
    loadgen_cores: float = math.nan
    load_before: str = ""
    error: str | None = None


async def _loadgen(
    loadgen: Path,
    port: int,
    material: Material,
    args: argparse.Namespace,
    tls: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    argv = [str(loadgen), "load", "-addr", f"127.0.0.1:{port}"]
    if tls:
        argv += ["-ca", str(material.ca_file)]
    for key, value in extra.items():
        if value is None:
            continue
        argv += [f"-{key}", str(value)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise base.BenchError(f"loadgen failed ({proc.returncode})")
    report: dict[str, Any] = json.loads(out)
    if report.get("first_error"):
        raise base.BenchError(f"loadgen: {report['failures']} failed: {report['first_error']}")
    return report


async def run_scenario(
    scenario: str, msgs: int, material: Material, loadgen: Path, args: argparse.Namespace
) -> Result:
    result = Result(scenario, msgs)
    root = Path(tempfile.mkdtemp(prefix=f"{scenario}-", dir=material.root))
    sink_port, port = base.free_port(), base.free_port()
    http = scenario == "relay-http"
    sink: Any = (
        MailgunSink(loadgen, sink_port)
        if http
        else base.Sink(base.find_tool("smtp-sink") or "smtp-sink", sink_port, root / "sink.log")
    )
    server: PostfixDovecot | AuthRelay
    if scenario == "postfix":
        server = PostfixDovecot(root, port, sink_port, material)
    else:
        profile = root / "relay.prof" if (http and args.profile_relay) else None
        server = AuthRelay(
            args.python,
            root,
            port,
            sink_port,
            material,
            label=scenario,
            cache=scenario != "relay-cold",
            http=http,
            profile=profile,
            workers=args.relay_workers,
        )
        if args.relay_workers > 1:
            result.scenario = f"{scenario} x{args.relay_workers}"
    cold = scenario == "relay-cold"
    sessions = args.cold_sessions if cold else args.sessions
    sessions = max(args.concurrency, sessions // msgs)
    logins = material.logins_file(machine=scenario == "relay-machine")
    try:
        await sink.start()
        await server.start()
        await asyncio.sleep(1.0)
        expected = 0
        if scenario in ("relay-warm", "relay-http"):
            # Logins of every user first, so the measured sessions are repeated logins. Each
            # worker keeps its own cache and the kernel spreads sessions over the workers:
            # with N workers, 4N logins per user leave (almost) no user cold in any worker.
            warmup = USERS * (1 if args.relay_workers == 1 else 4 * args.relay_workers)
            await _loadgen(
                loadgen, port, material, args, users=logins, concurrency=USERS, sessions=warmup
            )
            expected += warmup
        roots = server.roots()
        samplers = [base.MemorySampler(pid) for pid in roots]
        for sampler in samplers:
            sampler.start()
        cpu0 = sum(base.tree_cpu_seconds(pid) for pid in roots)
        result.load_before = base.load_average()
        started = time.monotonic()
        report = await _loadgen(
            loadgen,
            port,
            material,
            args,
            tls=scenario != "relay-plain",
            users=None if scenario in EXTRA_SCENARIOS else logins,
            concurrency=args.concurrency,
            sessions=sessions,
            msgs=msgs,
        )
        expected += report["messages"]
        reached = await sink.wait_for(expected, args.drain_timeout)
        cpu1 = sum(base.tree_cpu_seconds(pid) for pid in roots)
        for sampler in samplers:
            await sampler.stop()
        if reached is None:
            raise base.BenchError(f"the sink counted {sink.count} of {expected} messages")
        e2e = reached - started
        result.sessions = report["sessions"]
        result.messages = report["messages"]
        result.failures = report["failures"]
        result.sessions_per_s = report["sessions"] / report["elapsed"]
        result.e2e_msgs_per_s = report["messages"] / e2e
        result.p50_ms = report["p50"] * 1000
        result.p99_ms = report["p99"] * 1000
        result.server_cpu_ms_per_msg = (cpu1 - cpu0) / report["messages"] * 1000
        result.server_cores = (cpu1 - cpu0) / e2e
        result.peak_rss_mb = sum(s.peak_rss_kb for s in samplers) / 1024
        result.peak_pss_mb = sum(s.peak_pss_kb for s in samplers) / 1024
        result.loadgen_cpu_ms_per_session = report["cpu_seconds"] / report["sessions"] * 1000
        result.loadgen_cores = report["cpu_seconds"] / report["elapsed"]
    except base.BenchError as exc:
        result.error = f"{exc}\n{server.log_tail()}"
    finally:
        with contextlib.suppress(Exception):
            await server.stop()
        await sink.stop()
    if isinstance(server, AuthRelay) and server.options.profile is not None:
        print(f"\nWhere the relay's time goes ({scenario}, {msgs} msg/session, cProfile):")
        base.print_profile(server.options.profile, limit=35)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------
# Reporting and main


COLUMNS = (
    ("scenario", "{:<16}", "scenario"),
    ("msg/s", "{:>5}", "msgs_per_session"),
    ("sessions/s", "{:>11.1f}", "sessions_per_s"),
    ("e2e msg/s", "{:>10.1f}", "e2e_msgs_per_s"),
    ("p50 ms", "{:>8.1f}", "p50_ms"),
    ("p99 ms", "{:>8.1f}", "p99_ms"),
    ("CPU ms/msg", "{:>11.2f}", "server_cpu_ms_per_msg"),
    ("cores", "{:>6.2f}", "server_cores"),
    ("RSS MB", "{:>7.0f}", "peak_rss_mb"),
    ("PSS MB", "{:>7.0f}", "peak_pss_mb"),
    ("gen ms/sess", "{:>12.2f}", "loadgen_cpu_ms_per_session"),
    ("gen cores", "{:>10.2f}", "loadgen_cores"),
)


def table(results: list[Result]) -> str:
    head = "".join(
        fmt.replace(".1f", "").replace(".2f", "").replace(".0f", "").format(title)
        for title, fmt, _ in COLUMNS
    )
    lines = [head.replace("msg/s", "msgs ", 1)]
    for r in results:
        if r.error is not None:
            lines.append(
                f"{r.scenario:<16}{r.msgs_per_session:>5}  FAILED: {r.error.splitlines()[0]}"
            )
            continue
        lines.append("".join(fmt.format(getattr(r, attr)) for _, fmt, attr in COLUMNS))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS + EXTRA_SCENARIOS)}",
    )
    parser.add_argument("--msgs", default="1,10", help="messages per session, comma-separated")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--sessions", type=int, help="sessions per run (default 4000; quick 200)")
    parser.add_argument(
        "--cold-sessions", type=int, help="sessions for relay-cold (default 200; quick 40)"
    )
    parser.add_argument("--drain-timeout", type=float, default=300)
    parser.add_argument("--profile-relay", action="store_true")
    parser.add_argument(
        "--relay-workers",
        type=int,
        default=1,
        help="listener.workers of every relay scenario (processes sharing the port)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: short runs")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    if args.sessions is None:
        args.sessions = 200 if args.quick else 4000
    if args.cold_sessions is None:
        args.cold_sessions = 40 if args.quick else 200
    return args


async def bench(args: argparse.Namespace) -> int:
    missing = [t for t in ("postfix", "smtp-sink", "dovecot", "openssl") if not base.find_tool(t)]
    if missing:
        print(
            f"missing {', '.join(missing)}: `DEBIAN_FRONTEND=noninteractive apt-get install -y "
            "postfix dovecot-core openssl` (the services need not run)",
            file=sys.stderr,
        )
        return 2
    loadgen = await asyncio.to_thread(build_loadgen)
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-authbench-", dir=args.workdir))
    os.chmod(workdir, 0o755)
    material = Material(workdir)
    await asyncio.to_thread(material.make)
    print(f"load average before: {base.load_average()} ({os.cpu_count()} CPUs)")
    results: list[Result] = []
    try:
        for msgs in [int(m) for m in args.msgs.split(",")]:
            for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
                result = await run_scenario(scenario, msgs, material, loadgen, args)
                results.append(result)
                print(table([result]).splitlines()[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(results))
    print(f"load average after: {base.load_average()}")
    if args.json is not None:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0 if all(r.error is None for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(bench(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
