"""The structure-aware SMTP session fuzzer: a hypothesis state machine on real sockets.

`SmtpSessionMachine` opens up to `MAX_SESSIONS` concurrent sessions to a running relay
(`target.FuzzTarget`: a subprocess with two real aiosmtpd upstreams) and interleaves
commands on them: greetings, STARTTLS (and hostile variants), AUTH PLAIN and LOGIN with
good and bad credentials, MAIL and RCPT with valid, unusual and hostile addresses and
parameters, DATA with dot-stuffing, bare CR and LF, NUL bytes, 8-bit bytes, long and huge
lines, pipelined groups, RSET, NOOP, VRFY, HELP, unknown commands, raw hostile lines and
abrupt disconnects. A `Victim` thread meanwhile sends valid mail from another address.

Every reply is parsed and checked (`wire.parse_reply`) and compared with the model
(`smtp_model`); every command gets its reply within `wire.REPLY_TIMEOUT`, in order. After
each step the relay must be alive with bounded RSS. At the end of each example every
message that got 250 must arrive upstream exactly as the model says, nothing else may,
and the victim must have had every message accepted and delivered.

`run(target, ...)` runs it with given hypothesis settings; the test module and
`bench/smtp_fuzz.py` both use it.
"""

from __future__ import annotations

import base64
import contextlib
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mailrelay.support.fuzz.smtp_model import (
    UNKNOWN,
    Body,
    Expectation,
    ExpectedMessage,
    InputClasses,
    Ledger,
    Recipient,
    SessionState,
    Stats,
    expect_auth_result,
    expect_data_command,
    expect_ehlo,
    expect_mail,
    expect_rcpt,
    protocol_of,
    queue_id_of,
    route_for,
)
from mailrelay.support.fuzz.target import (
    DOMAIN_A,
    DOMAIN_B,
    HOSTILE_ADDRESS,
    TRUSTED_ADDRESS,
    USERS,
    VICTIM_ADDRESS,
    FuzzTarget,
)
from mailrelay.support.fuzz.wire import REPLY_TIMEOUT, Connection, ConnectionClosed, Reply

__all__ = ["MAX_SESSIONS", "FuzzRun", "Victim", "run"]

MAX_SESSIONS = 4
# The relay's RSS may grow this much over its size after start-up: hostile input must
# not make it hold more than a few messages' worth (limits.max_message_size is 64 KiB).
RSS_HEADROOM = 96 * 1024 * 1024
DELIVERY_WITHIN = 60.0
# aiosmtpd gives up on a session after 5 unknown commands; the default run stays below.
UNKNOWN_COMMANDS_PER_SESSION = 3
# With `unknown_command_limit` on, a 421 must come by this many unknown commands.
UNKNOWN_COMMANDS_LIMIT = 20
# Error replies (500-504) a session may earn; the one that reaches this is 421 4.7.0
# (relay/server.py, after Postfix's smtpd_hard_error_limit).
PROTOCOL_ERROR_LIMIT = 20


# -- strategies -----------------------------------------------------------------------------

_local = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789+-_", min_size=1, max_size=16)
_domain = st.sampled_from(
    [DOMAIN_A, DOMAIN_B, DOMAIN_A.upper(), "b.TEST", "c.test", "example.com", "a.test.evil"]
)


@dataclass(frozen=True)
class Address:
    """A path argument for MAIL/RCPT: the text after `FROM:`/`TO:`, and what the model
    knows about it."""

    raw: str
    address: str | None  # the address when the model knows it is valid
    ok: bool = True  # a well-formed path at all
    utf8: bool = False  # needs SMTPUTF8
    kind: str = "plain"


@st.composite
def plain_addresses(draw: st.DrawFn) -> Address:
    address = f"{draw(_local)}@{draw(_domain)}"
    return Address(f"<{address}>", address)


@st.composite
def utf8_addresses(draw: st.DrawFn) -> Address:
    local = draw(st.sampled_from(["josé", "用户", "ñandú", "δοκιμή", "a\u00e9b"]))
    address = f"{local}@{draw(st.sampled_from([DOMAIN_A, DOMAIN_B]))}"
    return Address(f"<{address}>", address, utf8=True, kind="utf8")


@st.composite
def unusual_addresses(draw: st.DrawFn) -> Address:
    """Printable paths aiosmtpd's full parser handles: the relay may refuse them, and
    if it takes one it must deliver it."""
    domain = draw(st.sampled_from([DOMAIN_A, DOMAIN_B]))
    local = draw(_local)
    raw = draw(
        st.sampled_from(
            [
                f'<"{local} x"@{domain}>',
                f'<"{local}\\"q"@{domain}>',
                f"<@relay.test:{local}@{domain}>",
                f"<{local}@{domain}> (comment)",
                f"{local}@{domain}",
                f"< {local}@{domain} >",
                f"<<{local}@{domain}>>",
                f"<{local}..x@{domain}>",
                f"<.{local}@{domain}>",
                f"<{local}@[127.0.0.1]>",
                f"<{local}@{domain}.>",
                f"<{'l' * 200}@{domain}>",
                f"<{local}@{'d' * 70}.{domain}>",
                f"<{local}@>",
                f"<@{domain}>",
                "<>",
                f"<{local}>",
                f"<{local}@{domain}",
                f"{local}@{domain}>",
                f"<{local}@{domain}>x",
                "",
            ]
        )
    )
    return Address(raw, None, ok=True, kind="unusual")


@st.composite
def control_addresses(draw: st.DrawFn) -> Address:
    """A NUL or other control character inside the address (flagged input class)."""
    char = draw(st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\t", "\x0b"]))
    local = draw(_local)
    cut = draw(st.integers(0, len(local)))
    address = f"{local[:cut]}{char}{local[cut:]}@{draw(st.sampled_from([DOMAIN_A, DOMAIN_B]))}"
    return Address(f"<{address}>", None, kind="control")


def _keyword(param: str) -> str:
    return param.partition("=")[0].upper()


@st.composite
def mail_params(draw: st.DrawFn, auth_parameter: bool) -> list[str]:
    choices = [
        "SIZE=100",
        "SIZE=999999999",
        "SIZE=abc",
        "SIZE=",
        "BODY=8BITMIME",
        "BODY=7BIT",
        "BODY=BINARYMIME",
        "body=8bitmime",
        "SMTPUTF8",
        "SMTPUTF8=yes",
        "X-FOO=bar",
        "=x",
    ]
    if auth_parameter:
        choices += ["AUTH=<>", "AUTH=alice@example.com"]
    # One of each keyword: which of two SIZE values counts is aiosmtpd's business.
    params = draw(st.lists(st.sampled_from(choices), max_size=3, unique_by=_keyword))
    if auth_parameter and draw(st.booleans()) and not any(_keyword(p) == "AUTH" for p in params):
        params = [*params, draw(st.sampled_from(["AUTH=<>", "AUTH=<alice@example.com>"]))]
    return params


_helo_names = st.sampled_from(
    ["client.test", "[127.0.0.1]", "x", "client\x01name", "a\tb", "éclair.test", "", "  "]
)


@st.composite
def bodies(draw: st.DrawFn, limits_size: int, max_received: int) -> Body:
    token = draw(st.integers(0, 10**9))
    received = draw(st.sampled_from([0, 0, 0, 1, max_received, max_received + 1]))
    head = b"".join(b"Received: from hop%d\r\n" % i for i in range(received))
    head += b"From: a@example.com\r\nSubject: fuzz\r\nMessage-ID: <%d@fuzz.test>\r\n\r\n" % token
    pieces = st.sampled_from(
        [
            b"plain text line\r\n",
            b".leading dot\r\n",
            b".\r\n",
            b"..\r\n",
            b"bare LF\nline\r\n",
            b"bare CR\rline\r\n",
            b"\n.\n",
            b"\r.\r",
            b"x\n.\r\n",
            b"x\r.\r\n",
            b"NUL\x00byte\r\n",
            b"\xff\xfe 8-bit \xe9\r\n",
            "Grüße UTF-8\r\n".encode(),
            b"MAIL FROM:<evil@x.test>\r\n",
            b"L" * 998 + b"\r\n",
            b"L" * 1200 + b"\r\n",
            b"\r\n",
            b" \t \r\n",
        ]
    )
    body = b"".join(draw(st.lists(pieces, max_size=12)))
    if draw(st.integers(0, 9)) == 0:
        body += b"H" * 900 + b"\r\n"
        body *= (2 * limits_size) // len(body) + 1
    ending = draw(st.sampled_from([b"", b"", b"no final CRLF", b"\n", b"\r"]))
    content = head + body + ending
    # A client that does not dot-stuff loses the leading dots (RFC 5321 4.5.2), which the
    # model expects; a bare "." line would end the data early, so that one is stuffed.
    unstuffed_safe = b"\r\n.\r\n" not in content and not content.endswith(b"\r\n.")
    return Body(content, stuff=not (unstuffed_safe and draw(st.booleans())))


# Hostile lines by name (a name keeps hypothesis's record of a failing run small).
RAW_LINES = {
    "empty": b"\r\n",
    "bare LF": b"NOOP\n",
    "8-bit command": b"\xff\xfe\r\n",
    "8-bit argument": b"NOOP \xff\xfe\r\n",
    "8-bit VRFY": b"VRFY <\xff@a.test>\r\n",
    "8-bit HELP": b"HELP \xff\r\n",
    "NUL in command": b"NO\x00OP\r\n",
    "bare CR": b"NOOP\rRSET\r\n",
    "600 octets": b"X" * 600 + b"\r\n",
    "long NOOP": b"NOOP " + b"a" * 3000 + b"\r\n",
    "long MAIL": b"MAIL FROM:<" + b"a" * 2000 + b"@a.test>\r\n",
    "long RCPT": b"RCPT TO:<x@a.test> " + b"P" * 1500 + b"\r\n",
    "4 MiB line": b"H" * (4 * 1024 * 1024) + b"\r\n",
}

TLS_GARBAGE = ["garbage after 220", "close after 220", "plaintext on 465"]

# -- the victim ----------------------------------------------------------------------------


@dataclass
class Victim:
    """Valid mail from VICTIM_ADDRESS on its own thread, one full session per message,
    while the fuzzer attacks; every message must get 250 and arrive."""

    target: FuzzTarget
    ledger: Ledger
    stats: Stats
    errors: list[str] = field(default_factory=list)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fuzz-victim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the message in flight; at least one message is always sent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)
            assert not self._thread.is_alive(), "the victim session hung"

    def _run(self) -> None:
        while True:
            try:
                self._one_message()
            except Exception as exc:  # reported by the machine's teardown
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            if self._stop.wait(0.05):
                return

    def _one_message(self) -> None:
        context = ssl.create_default_context(cafile=str(self.target.certs.ca_file))
        conn = Connection(
            "127.0.0.1", self.target.smtp_port, source=VICTIM_ADDRESS, tls_context=context
        )
        try:
            state = SessionState(source=VICTIM_ADDRESS, trusted=False, implicit_tls=False)
            steps: list[tuple[bytes, Expectation | None]] = [
                (b"", Expectation({220: None})),
                (b"EHLO victim.test\r\n", expect_ehlo(state, "EHLO", "victim.test")),
                (b"STARTTLS\r\n", Expectation({220: None})),
            ]
            for line, expectation in steps:
                if line:
                    conn.send(line)
                reply = conn.read_reply()
                self.stats.got(reply)
                assert expectation is not None
                expectation.check(state, reply, line.decode().strip() or "greeting")
            conn.starttls()
            state.reset_after_tls()
            self._exchange(conn, state, b"EHLO victim.test\r\n", expect_ehlo(state, "EHLO", "x"))
            blob = base64.b64encode(b"\x00alice\x00" + USERS["alice"].encode())
            auth = b"AUTH PLAIN " + blob + b"\r\n"
            self._exchange(conn, state, auth, expect_auth_result(state, "alice"))
            self.sent += 1
            rcpt = f"victim{self.sent}@{DOMAIN_A if self.sent % 2 else DOMAIN_B}"
            body = Body(
                b"From: victim@example.com\r\nSubject: victim %d\r\n\r\n.dot\r\nhello\r\n"
                % self.sent
            )
            # Pipelined, as real clients do.
            conn.send(f"MAIL FROM:<victim@example.com>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
            for check in (
                Expectation({250: "2.1.0"}),
                Expectation({250: "2.1.5"}),
                Expectation({354: None}),
            ):
                reply = conn.read_reply()
                self.stats.got(reply)
                check.check(state, reply, "victim transaction")
            conn.send(body.wire)
            reply = conn.read_reply()
            Expectation({250: "2.0.0"}).check(state, reply, "victim DATA")
            state.mail_from = "victim@example.com"
            state.greeting = "EHLO"
            self.ledger.accepted(
                ExpectedMessage(
                    queue_id=queue_id_of(reply),
                    mail_from="victim@example.com",
                    recipients=(_recipient(rcpt),),
                    stored=body.stored,
                    helo="victim.test",
                    peer=VICTIM_ADDRESS,
                    protocol=protocol_of(state),
                    victim=True,
                )
            )
            self.stats.victim_messages += 1
            conn.send(b"QUIT\r\n")
            Expectation({221: None}).check(state, conn.read_reply(), "QUIT")
        finally:
            conn.close()

    def _exchange(
        self, conn: Connection, state: SessionState, line: bytes, expectation: Expectation
    ) -> None:
        conn.send(line)
        reply = conn.read_reply()
        self.stats.got(reply)
        expectation.check(state, reply, line.decode(errors="replace").strip())


def _recipient(address: str) -> Recipient:
    route = route_for(address.rpartition("@")[2])
    assert route is not None
    return Recipient(address, route)


# -- the state machine -------------------------------------------------------------------------


@dataclass
class Session:
    """One open fuzzer session: its connection and the model's view of it."""

    conn: Connection
    state: SessionState


@dataclass
class FuzzRun:
    """What one `run` shares across examples: the target, the ledger, the statistics."""

    target: FuzzTarget
    classes: InputClasses = field(default_factory=InputClasses)
    ledger: Ledger = field(default_factory=Ledger)
    stats: Stats = field(default_factory=Stats)


class SmtpSessionMachine(RuleBasedStateMachine):
    """See the module docstring. `RUN` is set by `run` before hypothesis builds one."""

    RUN: FuzzRun | None = None

    def __init__(self) -> None:
        super().__init__()
        assert self.RUN is not None
        self.run = self.RUN
        self.target = self.run.target
        self.limits = self.target.limits
        self.classes = self.run.classes
        self.stats = self.run.stats
        self.sessions: list[Session] = []
        self.context = ssl.create_default_context(cafile=str(self.target.certs.ca_file))
        self.victim = Victim(self.target, self.run.ledger, self.stats)
        self.stats.examples += 1
        self.internal_errors = self._internal_errors()
        self.log_offset = len(self.target.log())  # this example's lines start here

    @initialize()
    def start_victim(self) -> None:
        self.victim.start()

    @initialize(data=st.data())
    def probe(self, data: st.DataObject) -> None:
        """At the start of every example: one valid transaction (pipelined, with a drawn
        body) and each switched-on input class once, so that a short run always has mail
        to deliver and exercises those classes; random steps then mix with them."""
        classes = self.classes
        self.open_session("submission", trusted=False, login="alice")
        if not self.sessions:
            return
        session = self.sessions[-1]
        sender = Address("<a@example.com>", "a@example.com")
        self._transaction(session, sender, [Address("<probe@a.test>", "probe@a.test")], data)
        if classes.envelope_controls:
            self._mail_with(session, data.draw(control_addresses(), "sender"), [])
            self._mail_with(session, sender, [])
            self._rcpt_with(session, data.draw(control_addresses(), "recipient"), [])
            self._command(session, "RSET", "RSET", self._simple(session.state, "RSET"))
        if classes.envelope_non_ascii:
            self._mail_with(session, data.draw(utf8_addresses(), "sender"), [])
            self._mail_with(session, sender, [])
            self._rcpt_with(session, data.draw(utf8_addresses(), "recipient"), [])
            self._command(session, "RSET", "RSET", self._simple(session.state, "RSET"))
        if classes.auth_parameter:
            param = data.draw(st.sampled_from(["AUTH=<>", "AUTH=<a@example.com>"]), "param")
            self._mail_with(session, sender, [param])
            self._command(session, "RSET", "RSET", self._simple(session.state, "RSET"))
        if classes.tls_garbage:
            self.tls_garbage(data.draw(st.sampled_from(TLS_GARBAGE), "how"))
        if classes.unknown_command_limit:
            self.unknown_flood(len(self.sessions) - 1)
        if classes.idle_timeout and self.sessions:
            self.idle(len(self.sessions) - 1, in_data=data.draw(st.booleans(), "in DATA"))

    # -- helpers ---------------------------------------------------------------------------

    def _session(self, index: int) -> Session:
        return self.sessions[index % len(self.sessions)]

    def _drop(self, session: Session, *, reset: bool = False) -> None:
        session.conn.close(reset=reset)
        if session in self.sessions:
            self.sessions.remove(session)

    def _read(self, session: Session, command: str, expectation: Expectation) -> Reply | None:
        """Read one reply and check it; None (session dropped) if the relay closed."""
        try:
            reply = session.conn.read_reply()
        except ConnectionClosed:
            self.stats.got("closed")
            raise AssertionError(
                f"relay closed the session instead of answering {command!r}"
            ) from None
        self.stats.got(reply)
        state = session.state
        if state.protocol_errors >= PROTOCOL_ERROR_LIMIT - 1 and any(
            500 <= code <= 504 for code in expectation.allowed
        ):
            # The relay's error limit (like Postfix's smtpd_hard_error_limit): the error
            # reply that reaches it becomes 421 4.7.0, and the session ends.
            expectation = Expectation(
                {**expectation.allowed, 421: "4.7.0"},
                {**expectation.then, 421: _close_state},
                why=f"{expectation.why}; error limit",
            )
        expectation.check(state, reply, command)
        if 500 <= reply.code <= 504:
            state.protocol_errors += 1
        if session.state.closed:
            assert session.conn.at_eof(), f"no close after {reply}"
            self._drop(session)
            return None
        return reply

    def _send(self, session: Session, data: bytes, kind: str) -> bool:
        self.stats.sent(kind)
        try:
            session.conn.send(data)
        except ConnectionClosed:
            raise AssertionError(f"relay closed the session before {kind}") from None
        return True

    def _command(
        self, session: Session, line: str, kind: str, expectation: Expectation
    ) -> Reply | None:
        self._send(session, line.encode("utf-8", "surrogateescape") + b"\r\n", kind)
        return self._read(session, line, expectation)

    # -- sessions --------------------------------------------------------------------------

    @precondition(lambda self: len(self.sessions) < MAX_SESSIONS)
    @rule(
        listener=st.sampled_from(["submission", "submission", "implicit"]),
        trusted=st.booleans(),
        login=st.sampled_from([None, None, "alice", "bob"]),
    )
    def open_session(self, listener: str, trusted: bool, login: str | None) -> None:
        """A new session; with `login`, greeted, in TLS and authenticated at once (so
        that more of the steps after it reach a transaction)."""
        implicit = listener == "implicit"
        source = TRUSTED_ADDRESS if trusted else HOSTILE_ADDRESS
        port = self.target.implicit_tls_port if implicit else self.target.smtp_port
        self.stats.sent(f"connect {listener}")
        conn = Connection(
            "127.0.0.1", port, source=source, implicit_tls=implicit, tls_context=self.context
        )
        state = SessionState(source=source, trusted=trusted, implicit_tls=implicit, tls=implicit)
        session = Session(conn, state)
        self.sessions.append(session)
        # 421 4.7.x: the relay may refuse a client address over its connection limits.
        self._read(session, "greeting", Expectation({220: None, 421: None}, {421: _close_state}))
        steps: list[Callable[[int], None]] = [lambda i: self.greet(i, "EHLO", "client.test")]
        if not implicit:
            steps += [
                lambda i: self.starttls(i, inject=False),
                lambda i: self.greet(i, "EHLO", "client.test"),
            ]
        steps.append(lambda i: self.auth(i, "PLAIN-initial", login))
        for step in steps if login is not None else []:
            if session not in self.sessions:
                return
            step(self.sessions.index(session))

    @precondition(lambda self: bool(self.sessions))
    @rule(
        index=st.integers(0, MAX_SESSIONS - 1),
        verb=st.sampled_from(["EHLO", "EHLO", "HELO"]),
        name=_helo_names,
    )
    def greet(self, index: int, verb: str, name: str) -> None:
        session = self._session(index)
        self._command(
            session, f"{verb} {name}".rstrip(" "), verb, expect_ehlo(session.state, verb, name)
        )

    @precondition(lambda self: bool(self.sessions))
    @rule(index=st.integers(0, MAX_SESSIONS - 1), inject=st.booleans())
    def starttls(self, index: int, inject: bool) -> None:
        """STARTTLS; with `inject`, commands pipelined behind it, which the relay must
        throw away (RFC 3207 4.2, the STARTTLS command injection of CVE-2011-0411)."""
        session = self._session(index)
        state = session.state
        line = b"STARTTLS\r\n" + (b"MAIL FROM:<evil@x.test>\r\nNOOP\r\n" if inject else b"")
        self._send(session, line, "STARTTLS" + (" injected" if inject else ""))
        if state.implicit_tls:
            reply = self._read(session, "STARTTLS", Expectation({503: "5.5.1"}))
            if inject and reply is not None:
                # Already TLS: the pipelined commands are ordinary commands then.
                self._injected_replies(session)
            return
        if state.tls:
            # A second STARTTLS inside TLS must be refused, not nest a second handshake.
            reply = self._read(session, "STARTTLS", Expectation({503: "5.5.1"}))
            if inject and reply is not None:
                self._injected_replies(session)
            return
        reply = self._read(session, "STARTTLS", Expectation({220: None}))
        if reply is None:
            return
        session.conn.starttls()
        state.reset_after_tls()
        # Nothing the client sent before the handshake may be answered after it.
        self._command(session, "NOOP", "NOOP", Expectation({250: None}))

    def _injected_replies(self, session: Session) -> None:
        """Already in TLS: the commands behind STARTTLS are ordinary commands."""
        mail = expect_mail(session.state, "evil@x.test", [], limits=self.limits, address_ok=True)
        if self._read(session, "MAIL", mail) is not None:
            self._read(session, "NOOP", Expectation({250: None}))

    @precondition(lambda self: bool(self.sessions))
    @rule(
        index=st.integers(0, MAX_SESSIONS - 1),
        mechanism=st.sampled_from(["PLAIN", "PLAIN-initial", "LOGIN", "LOGIN-initial", "CRAM-MD5"]),
        who=st.sampled_from(["alice", "bob", "alice-wrong", "nobody", "bad-base64", "cancel"]),
    )
    def auth(self, index: int, mechanism: str, who: str) -> None:
        session = self._session(index)
        state = session.state
        user = who.split("-", maxsplit=1)[0]
        password = USERS.get(user, "x") + ("-wrong" if who.endswith("wrong") else "")
        good = who in USERS
        plain = base64.b64encode(f"\x00{user}\x00{password}".encode()).decode()
        kind = f"AUTH {mechanism} {who}"
        name = mechanism.split("-", maxsplit=1)[0]
        if mechanism == "PLAIN-initial":
            first = f"AUTH PLAIN {'***' if who == 'bad-base64' else plain}"
        elif mechanism == "LOGIN-initial":
            first = f"AUTH LOGIN {'***' if who == 'bad-base64' else _b64(user)}"
        else:
            first = f"AUTH {name}"
        self.stats.sent(kind)
        session.conn.send(first.encode() + b"\r\n")
        gate = self._auth_gate(state, name)
        if gate is not None:
            self._read(session, first, gate)
            return
        if who == "bad-base64" and mechanism.endswith("initial"):
            self._read(session, first, Expectation({501: "5.5.2"}))
            return
        answers: list[str] = []
        if mechanism == "PLAIN":
            answers = [plain]
        elif mechanism == "LOGIN":
            answers = [_b64(user), _b64(password)]
        elif mechanism == "LOGIN-initial":
            answers = [_b64(password)]
        # PLAIN with an initial response has no challenge to cancel: it is just a user
        # named "cancel" (unknown).
        cancel = who == "cancel" and mechanism != "PLAIN-initial"
        if cancel:
            answers = ["*"]
        elif who == "bad-base64":
            answers = ["***"]
        for answer in answers:
            reply = self._read(session, first, Expectation({334: None}))
            if reply is None:
                return
            session.conn.send(answer.encode() + b"\r\n")
        if cancel:
            self._read(session, first, Expectation({501: None}))
        elif who == "bad-base64":
            self._read(session, first, Expectation({501: "5.5.2"}))
        else:
            self._read(session, first, expect_auth_result(state, user if good else None))

    @staticmethod
    def _auth_gate(state: SessionState, mechanism: str) -> Expectation | None:
        """The refusal AUTH gets before any exchange, or None when it may start."""
        if state.greeting is None:
            return Expectation({503: None})
        if state.greeting == "HELO":
            return Expectation({500: None})
        if not state.tls:
            return Expectation({538: "5.7.11"})
        if state.user is not None:
            return Expectation({503: None})
        if mechanism not in ("PLAIN", "LOGIN"):
            return Expectation({504: "5.5.4"})
        return None

    # -- the transaction ---------------------------------------------------------------------

    def _addresses(self) -> st.SearchStrategy[Address]:
        options = [plain_addresses(), plain_addresses(), utf8_addresses(), unusual_addresses()]
        # A switched-on class gets half the draws: the tests that enable it are short.
        if self.classes.envelope_controls:
            options += [control_addresses()] * 4
        if self.classes.envelope_non_ascii:
            options += [utf8_addresses()] * 4
        return st.one_of(*options)

    def _mail_expectation(
        self, state: SessionState, sender: Address, params: list[str]
    ) -> Expectation:
        refusal = self._refusal(state, sender, params, mail=True)
        if sender.kind == "unusual":
            # Taken or refused; if taken, the path is what aiosmtpd parsed of it.
            expectation = expect_mail(state, UNKNOWN, params, limits=self.limits, address_ok=True)
            allowed = dict(expectation.allowed)
            if state.greeting is not None:  # parsed before the nesting check
                allowed.update({501: None, 553: None, 555: None})
            if params:
                # An unbracketed path may swallow what looks like parameters as its
                # address (aiosmtpd's lenient parser): then it is a MAIL without them.
                bare = expect_mail(state, UNKNOWN, [], limits=self.limits, address_ok=True)
                allowed.update(bare.allowed)
            return Expectation(allowed, {250: _mail_opened(None, params)}, why="unusual sender")
        address = sender.address
        if sender.utf8 and "SMTPUTF8" not in [p.upper() for p in params] and refusal is None:
            # Only with envelope_non_ascii enabled does the model know the right answer.
            return Expectation(
                {
                    553: None,
                    250: "2.1.0",
                    503: None,
                    501: None,
                    530: "5.7.0",
                    555: None,
                    552: "5.3.4",
                },
                {250: _mail_opened(address, params)},
                why="non-ASCII sender without SMTPUTF8 (unflagged)",
            )
        return expect_mail(
            state, address, params, limits=self.limits, address_ok=sender.ok, refusal=refusal
        )

    def _refusal(
        self, state: SessionState, address: Address, params: list[str], *, mail: bool
    ) -> tuple[int, str] | None:
        if state.greeting is None:
            return None
        if not mail and state.mail_from is None:
            return None
        if address.kind == "control" and self.classes.envelope_controls:
            # RFC 3463: X.1.7 is the sender's bad syntax, X.1.3 the recipient's.
            return (501, "5.1.7|5.1.3" if mail else "5.1.3")
        smtputf8 = state.smtputf8 if not mail else any(p.upper() == "SMTPUTF8" for p in params)
        if address.utf8 and not smtputf8 and self.classes.envelope_non_ascii:
            return (553, "5.6.7")
        return None

    @precondition(lambda self: bool(self.sessions))
    @rule(index=st.integers(0, MAX_SESSIONS - 1), data=st.data())
    def mail(self, index: int, data: st.DataObject) -> None:
        session = self._session(index)
        sender = data.draw(st.one_of(self._addresses(), st.just(Address("<>", "<>"))), "sender")
        params = data.draw(mail_params(self.classes.auth_parameter), "params")
        if not self.classes.auth_parameter and any(p.upper().startswith("AUTH=") for p in params):
            params = [p for p in params if not p.upper().startswith("AUTH=")]
        keywords = {_keyword(p) for p in params}
        if sender.utf8 and not self.classes.envelope_non_ascii and "SMTPUTF8" not in keywords:
            params = [*params, "SMTPUTF8"]
        self._mail_with(session, sender, params)

    def _mail_with(self, session: Session, sender: Address, params: list[str]) -> Reply | None:
        line = " ".join([f"MAIL FROM:{sender.raw}", *params])
        expectation = self._mail_expectation(session.state, sender, params)
        return self._command(session, line, f"MAIL {sender.kind}", expectation)

    @precondition(lambda self: bool(self.sessions))
    @rule(index=st.integers(0, MAX_SESSIONS - 1), data=st.data())
    def rcpt(self, index: int, data: st.DataObject) -> None:
        session = self._session(index)
        state = session.state
        rcpt = data.draw(self._addresses(), "recipient")
        if rcpt.utf8 and not state.smtputf8 and not self.classes.envelope_non_ascii:
            rcpt = data.draw(plain_addresses(), "ascii recipient")
        params = data.draw(
            st.lists(st.sampled_from(["NOTIFY=SUCCESS", "ORCPT=rfc822;x@y", "X=1"]), max_size=1),
            "params",
        )
        self._rcpt_with(session, rcpt, params)

    def _rcpt_with(self, session: Session, rcpt: Address, params: list[str]) -> Reply | None:
        state = session.state
        line = " ".join([f"RCPT TO:{rcpt.raw}", *params])
        refusal = self._refusal(state, rcpt, params, mail=False)
        expectation = expect_rcpt(
            state,
            rcpt.address if rcpt.kind != "unusual" else None,
            params,
            limits=self.limits,
            address_ok=rcpt.ok,
            refusal=refusal,
            raw=rcpt.raw,
        )
        return self._command(session, line, f"RCPT {rcpt.kind}", expectation)

    @precondition(lambda self: bool(self.sessions))
    @rule(index=st.integers(0, MAX_SESSIONS - 1), data=st.data())
    def data(self, index: int, data: st.DataObject) -> None:
        session = self._session(index)
        reply = self._command(session, "DATA", "DATA", expect_data_command(session.state))
        if reply is None or reply.code != 354:
            return
        body = data.draw(
            bodies(self.limits.max_message_size, self.limits.max_received_headers), "body"
        )
        self._finish_data(session, body)

    def _finish_data(self, session: Session, body: Body, *, sent: bool = False) -> None:
        """Send the body (unless it went out with a pipelined group) and check the reply."""
        state = session.state
        if not sent:
            huge = len(body.wire) > self.limits.max_message_size
            self._send(session, body.wire, "DATA body" + (" huge" if huge else ""))
        outcome = body.outcome(self.limits)
        snapshot = (state.mail_from, list(state.rcpts), protocol_of(state), state.helo_name)

        def accepted(state: SessionState, reply: Reply) -> None:
            mail_from, rcpts, protocol, helo = snapshot
            assert mail_from is not None
            self.run.ledger.accepted(
                ExpectedMessage(
                    queue_id=queue_id_of(reply),
                    mail_from=mail_from,
                    recipients=tuple(rcpts),
                    stored=body.stored,
                    helo=helo,
                    peer=state.source,
                    protocol=protocol,
                )
            )

        def done(state: SessionState, reply: Reply) -> None:
            if reply.code == 250:
                accepted(state, reply)
            state.reset_transaction()

        then: dict[int, Callable[[SessionState, Reply], None]] = {code: done for code in outcome}
        self._read(
            session,
            "end of DATA",
            Expectation(outcome, then, why=f"body of {len(body.wire)} bytes"),
        )

    @precondition(lambda self: bool(self.sessions))
    @rule(
        index=st.integers(0, MAX_SESSIONS - 1),
        data=st.data(),
        quit_after=st.booleans(),
    )
    def pipelined_transaction(self, index: int, data: st.DataObject, quit_after: bool) -> None:
        """MAIL, RCPTs and DATA in one write (RFC 2920); when the model is sure of the
        354, the body and QUIT go in the same write too."""
        session = self._session(index)
        sender = data.draw(plain_addresses(), "sender")
        rcpts = data.draw(
            st.lists(plain_addresses(), min_size=1, max_size=self.limits.max_recipients + 1),
            "rcpts",
        )
        self._transaction(session, sender, rcpts, data, quit_after=quit_after)

    def _transaction(
        self,
        session: Session,
        sender: Address,
        rcpts: list[Address],
        data: st.DataObject,
        *,
        quit_after: bool = False,
    ) -> None:
        state = session.state
        body = data.draw(
            bodies(self.limits.max_message_size, self.limits.max_received_headers), "body"
        )
        lines = [f"MAIL FROM:{sender.raw}", *(f"RCPT TO:{r.raw}" for r in rcpts), "DATA"]
        group = "".join(f"{line}\r\n" for line in lines).encode()
        # Predict on a copy: the 354 is certain when MAIL and one RCPT will pass.
        probe = SessionState(**{**state.__dict__, "rcpts": list(state.rcpts)})
        sure = expect_mail(
            probe, sender.address, [], limits=self.limits, address_ok=True
        ).allowed == {250: "2.1.0"} and any(
            r.address is not None and r.address.rpartition("@")[2].lower() in (DOMAIN_A, DOMAIN_B)
            for r in rcpts
        )
        blast = sure and data.draw(st.booleans(), "blast")
        if blast:
            group += body.wire + (b"QUIT\r\n" if quit_after else b"")
        self._send(session, group, "pipelined transaction" + (" blast" if blast else ""))
        self._read(
            session,
            lines[0],
            expect_mail(state, sender.address, [], limits=self.limits, address_ok=True),
        )
        if session not in self.sessions:
            return
        for rcpt, line in zip(rcpts, lines[1:-1], strict=True):
            if session not in self.sessions:
                return
            self._read(
                session,
                line,
                expect_rcpt(state, rcpt.address, [], limits=self.limits, address_ok=True),
            )
        if session not in self.sessions:
            return
        reply = self._read(session, "DATA", expect_data_command(state))
        if reply is None:
            return
        if reply.code != 354:
            assert not blast
            return
        if blast:
            self._finish_data(session, body, sent=True)
            if quit_after:
                self._read(session, "QUIT", Expectation({221: None}, {221: _close_state}))
        else:
            self._finish_data(session, body)

    # -- other commands ----------------------------------------------------------------------

    @precondition(lambda self: bool(self.sessions))
    @rule(
        index=st.integers(0, MAX_SESSIONS - 1),
        commands=st.lists(
            st.sampled_from(
                [
                    "NOOP",
                    "RSET",
                    "VRFY <a@a.test>",
                    "VRFY",
                    "HELP",
                    "HELP MAIL",
                    "NOOP x",
                    "RSET x",
                    "EXPN x",
                    "XUNKNOWN",
                    "QUIT",
                ]
            ),
            min_size=1,
            max_size=6,
        ),
    )
    def simple_commands(self, index: int, commands: list[str]) -> None:
        """A pipelined group of simple commands: each reply is told apart by its code or
        text, so an answer out of order fails."""
        session = self._session(index)
        state = session.state
        budget = UNKNOWN_COMMANDS_PER_SESSION - state.unknown_commands
        kept: list[str] = []
        for command in commands:
            if command == "XUNKNOWN" and not self.classes.unknown_command_limit:
                if budget <= 0:
                    continue
                budget -= 1
            kept.append(command)
            if command == "QUIT":
                break
        if not kept:
            return
        self._send(session, "".join(f"{c}\r\n" for c in kept).encode(), "simple group")
        for command in kept:
            self.stats.sent(command.split()[0])
            if self._read(session, command, self._simple(state, command)) is None:
                return

    def _simple(self, state: SessionState, command: str) -> Expectation:
        def reset(state: SessionState, reply: Reply) -> None:
            assert reply.text == "OK", reply
            state.reset_transaction()

        def ok(state: SessionState, reply: Reply) -> None:
            assert reply.text == "OK", reply

        match command:
            case "NOOP" | "NOOP x":
                return Expectation({250: None}, {250: ok})
            case "RSET":
                return Expectation({250: None}, {250: reset})
            case "RSET x":
                return Expectation({501: None})
            case "VRFY <a@a.test>":
                return Expectation({252: None})
            case "VRFY":
                return Expectation({501: None})
            case "HELP":
                return Expectation({250: None})
            case "HELP MAIL":
                return Expectation({250: None})
            case "EXPN x":
                return Expectation({502: None})
            case "QUIT":
                return Expectation({221: None}, {221: _close_state})
            case _:
                return self._unknown(state)

    def _unknown(self, state: SessionState) -> Expectation:
        def counted(state: SessionState, reply: Reply) -> None:
            state.unknown_commands += 1

        if self.classes.unknown_command_limit:
            # The fix: past a small limit, 421 and the connection closes.
            return Expectation({500: None, 421: None}, {500: counted, 421: _close_state})
        return Expectation({500: None}, {500: counted})

    @precondition(lambda self: bool(self.sessions))
    @rule(
        index=st.integers(0, MAX_SESSIONS - 1),
        name=st.sampled_from(sorted(RAW_LINES)),
    )
    def raw_line(self, index: int, name: str) -> None:
        """One hostile line: the relay answers with a well-formed reply and stays up."""
        line = RAW_LINES[name]
        session = self._session(index)
        state = session.state
        kind = f"raw {name}"
        unknown = _raw_kind(line) == "unknown"
        if (
            unknown
            and not self.classes.unknown_command_limit
            and state.unknown_commands >= UNKNOWN_COMMANDS_PER_SESSION
        ):
            return
        self._send(session, line, kind)
        self._read(session, repr(line[:40]), self._raw_expectation(state, line))

    def _raw_expectation(self, state: SessionState, line: bytes) -> Expectation:
        match _raw_kind(line):
            case "too long" | "syntax":
                return Expectation({500: None})
            case "NOOP":
                return Expectation({250: None})
            case "VRFY":
                return Expectation({252: None, 501: None, 502: None})
            case "HELP":
                return Expectation({250: None, 501: None})
            case _:
                return self._unknown(state)

    @precondition(lambda self: bool(self.sessions) and self.classes.unknown_command_limit)
    @rule(index=st.integers(0, MAX_SESSIONS - 1))
    def unknown_flood(self, index: int) -> None:
        """Unknown commands until the relay gives up: 500 each, then 421 and the close,
        within UNKNOWN_COMMANDS_LIMIT (the relay's limit may be lower)."""
        session = self._session(index)
        self.stats.sent("unknown flood")
        for n in range(UNKNOWN_COMMANDS_LIMIT + 1):
            assert n < UNKNOWN_COMMANDS_LIMIT, f"no 421 after {n} unknown commands"
            reply = self._command(session, f"XFLOOD{n}", "XFLOOD", self._unknown(session.state))
            if reply is None:  # 421, and the connection closed
                return

    @precondition(lambda self: bool(self.sessions) and self.classes.idle_timeout)
    @rule(index=st.integers(0, MAX_SESSIONS - 1), in_data=st.booleans())
    def idle(self, index: int, in_data: bool) -> None:
        """Say nothing past the command (or DATA) timeout: 421 4.4.2, then the close."""
        session = self._session(index)
        timeout = self.limits.command_timeout_seconds
        if in_data and session.state.rcpts:
            reply = self._command(session, "DATA", "DATA", expect_data_command(session.state))
            if reply is None:
                return
            session.conn.send(b"Subject: slow\r\n")
            timeout = self.limits.data_timeout_seconds
        self.stats.sent("idle" + (" in DATA" if in_data else ""))
        time.sleep(timeout + 0.2)
        self._read(session, "idle", Expectation({421: "4.4.2"}, {421: _close_state}))

    @precondition(lambda self: self.classes.tls_garbage and len(self.sessions) < MAX_SESSIONS)
    @rule(how=st.sampled_from(TLS_GARBAGE))
    def tls_garbage(self, how: str) -> None:
        """A client that fails the TLS handshake: the relay drops it, logs it once without
        a traceback and does not count it as an internal error (checked at teardown)."""
        self.stats.sent(f"TLS {how}")
        implicit = how.endswith("465")
        port = self.target.implicit_tls_port if implicit else self.target.smtp_port
        conn = Connection("127.0.0.1", port, source=HOSTILE_ADDRESS)
        try:
            if implicit:
                conn.send(b"EHLO plain.test\r\n")
            else:
                assert conn.read_reply().code == 220
                conn.send(b"STARTTLS\r\n")
                assert conn.read_reply().code == 220
                if how.startswith("garbage"):
                    conn.send(b"\x16\x03\x01\x00\x05hello, not TLS\r\n" * 4)
                else:
                    return
            # The relay ends the connection; a TLS alert or nothing may come first.
            conn.sock.settimeout(REPLY_TIMEOUT)
            with contextlib.suppress(OSError):
                while conn.sock.recv(4096):
                    pass
        finally:
            conn.close()

    @precondition(lambda self: bool(self.sessions))
    @rule(
        index=st.integers(0, MAX_SESSIONS - 1),
        how=st.sampled_from(["close", "reset", "mid-line", "mid-data", "mid-data-reset"]),
    )
    def disconnect(self, index: int, how: str) -> None:
        """Hang up abruptly; whatever was in flight must not be delivered."""
        session = self._session(index)
        self.stats.sent(f"disconnect {how}")
        if how == "mid-line":
            session.conn.send(b"MAIL FROM:<cut@a.te")
        elif how.startswith("mid-data") and session.state.rcpts:
            reply = self._command(session, "DATA", "DATA", expect_data_command(session.state))
            if reply is None:
                return
            session.conn.send(b"Subject: cut\r\n\r\npartial body\r\n.")
        self._drop(session, reset=how.endswith("reset"))

    # -- invariants and teardown --------------------------------------------------------------

    @invariant()
    def relay_alive_and_bounded(self) -> None:
        self.stats.steps += 1
        self.target.assert_alive()
        growth = self.target.rss() - self.target.baseline_rss
        self.stats.peak_rss_growth = max(self.stats.peak_rss_growth, growth)
        assert growth < RSS_HEADROOM, f"relay RSS grew by {growth / 2**20:.0f} MiB"

    def teardown(self) -> None:
        for session in list(self.sessions):
            self._drop(session)
        self.victim.stop()
        assert not self.victim.errors, f"the victim session failed: {self.victim.errors}"
        self.target.assert_alive()
        self._check_deliveries()
        assert self._internal_errors() == self.internal_errors, (
            "the relay answered 451 for an internal error:\n" + self.target.log()[-3000:]
        )
        if self.classes.tls_garbage:
            lines = self.target.log()[self.log_offset :]
            assert "Traceback" not in lines, lines[-3000:]

    def _internal_errors(self) -> float:
        labels = {"reason": "internal_error"}
        return self.target.metric("mailrelay_messages_rejected_total", labels)

    def _check_deliveries(self) -> None:
        ledger = self.run.ledger
        deadline = time.monotonic() + DELIVERY_WITHIN
        while True:
            records = [
                (route, m.mail_from, m.rcpt_tos, m.data)
                for route, m in self.target.upstream_messages()
            ]
            missing = ledger.missing((route, data) for route, _, _, data in records)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.stats.delivered += ledger.check(records)
        assert not missing, (
            f"accepted with 250 but not delivered within {DELIVERY_WITHIN}s: {sorted(missing)}\n"
            + self.target.log()[-3000:]
        )


_KNOWN = {
    b"HELO",
    b"EHLO",
    b"MAIL",
    b"RCPT",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"VRFY",
    b"HELP",
    b"STARTTLS",
    b"AUTH",
    b"EXPN",
}


def _raw_kind(line: bytes) -> str:
    """How aiosmtpd takes one raw line: too long, bad syntax, a known command, or an
    unknown one (which counts towards its limit of unknown commands)."""
    text = line[: line.index(b"\n") + 1].rstrip(b"\r\n")
    if len(text) > 512:
        return "too long"
    name = text.partition(b" ")[0].upper()
    if not text or not name.isascii():
        return "syntax"
    if name in _KNOWN:
        return name.decode()
    return "unknown"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _close_state(state: SessionState, reply: Reply) -> None:
    state.closed = True


def _mail_opened(
    address: str | None, params: list[str] | None = None
) -> Callable[[SessionState, Reply], None]:
    smtputf8 = any(p.upper() == "SMTPUTF8" for p in params or [])

    def opened(state: SessionState, reply: Reply) -> None:
        state.mail_from = address if address is not None else UNKNOWN
        state.smtputf8 = smtputf8
        state.rcpts = []

    return opened


def run(fuzz: FuzzRun, hypothesis_settings: settings) -> None:
    """Run the machine against `fuzz.target` under `hypothesis_settings`."""
    SmtpSessionMachine.RUN = fuzz
    try:
        run_state_machine_as_test(
            SmtpSessionMachine,
            settings=settings(
                hypothesis_settings,
                # The explain phase re-runs a failure many times over; on real sockets that
                # costs minutes and says little the shrunk steps do not.
                phases=[p for p in hypothesis_settings.phases if p is not Phase.explain],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            ),
        )
    finally:
        SmtpSessionMachine.RUN = None
