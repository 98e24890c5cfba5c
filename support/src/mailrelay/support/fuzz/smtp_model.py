"""What the relay must answer, and what must reach the upstreams: the fuzzer's oracle.

Pure pieces, no sockets:

* `SessionState` is what one SMTP session has established (greeting, TLS, user, the
  open transaction). The `expect_*` functions take a state and a command and return an
  `Expectation`: the reply codes allowed (with the enhanced status code required for the
  relay's own replies) and how the state moves on for each. Inputs the model can predict
  exactly (valid addresses, known parameters) get exactly one allowed code; hostile inputs
  whose refusal code is aiosmtpd's business get a set that never contains a success.
* `Body` builds a DATA section (dot-stuffed on the wire) from hostile pieces and knows
  what the relay must answer for it and what an upstream must receive.
* `Ledger` holds every message that got a `250` after DATA and checks the upstreams'
  records against it: each delivered once per route with the exact envelope and bytes
  (our Received header, then the body with CRLF line endings), nothing else delivered.
* `InputClasses` switches on input classes the default run leaves out, each with the
  behaviour issue 16 asked for (see tests/security/test_smtp_fuzz.py).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from mailrelay.support.fuzz.target import BOB_DOMAIN, DOMAIN_A, DOMAIN_B, RELAY_HOSTNAME, Limits
from mailrelay.support.fuzz.wire import Reply

__all__ = [
    "UNKNOWN",
    "Body",
    "Expectation",
    "InputClasses",
    "Ledger",
    "SessionState",
    "Stats",
    "expect_auth_result",
    "expect_data_command",
    "expect_ehlo",
    "expect_mail",
    "expect_rcpt",
    "route_for",
]

ROUTES = {DOMAIN_A: "route-a", DOMAIN_B: "route-b"}
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")
_RECEIVED = re.compile(
    rb"Received: from (?P<helo>\S+) \(\[(?P<peer>[0-9.]+)\]\)\r\n"
    rb"\tby (?P<by>\S+) \(mailrelay\) with (?P<proto>\w+) id (?P<qid>\S+)"
    rb"(?:\r\n\tfor <(?P<for>[^>\r\n]*)>)?; (?P<date>[^\r\n]+)\r\n"
)
# The sender of a transaction whose MAIL path was unusual: the model does not predict it.
UNKNOWN = "<unknown>"
_QUEUED = re.compile(r"2\.0\.0 Ok: queued as (\S+)$")


@dataclass(frozen=True)
class InputClasses:
    """Hostile input classes beyond the default set, each probed at the start of every
    example when on, with the behaviour issue 16 asked for."""

    envelope_controls: bool = False  # NUL/control character in MAIL/RCPT: 501 5.1.3
    envelope_non_ascii: bool = False  # non-ASCII address without SMTPUTF8: 553 5.6.7
    auth_parameter: bool = False  # MAIL FROM:<...> AUTH=<> is accepted (RFC 4954 5)
    unknown_command_limit: bool = False  # too many unknown commands: 421, then close
    idle_timeout: bool = False  # idling past the command timeout: 421 4.4.2, then close
    tls_garbage: bool = False  # bad TLS handshakes: no traceback, not internal_error


@dataclass
class Stats:
    """What a fuzz run tried and saw (printed by bench/smtp_fuzz.py)."""

    commands: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    examples: int = 0
    steps: int = 0
    delivered: int = 0
    victim_messages: int = 0
    peak_rss_growth: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sent(self, kind: str) -> None:
        with self._lock:
            self.commands[kind] += 1

    def got(self, reply: Reply | str) -> None:
        with self._lock:
            key = reply if isinstance(reply, str) else f"{reply.code} {reply.enhanced or '-'}"
            self.replies[key] += 1


# -- session state and expectations ---------------------------------------------------------


@dataclass
class Recipient:
    """A recipient that got 250: the address (None when the model cannot predict how the
    relay parsed it) and its route."""

    address: str | None
    route: str


@dataclass
class SessionState:
    """What one session has established, as the relay must see it."""

    source: str
    trusted: bool
    implicit_tls: bool
    tls: bool = False
    greeting: str | None = None  # "HELO" or "EHLO"
    helo_name: str = ""
    user: str | None = None
    auth_failures: int = 0
    mail_from: str | None = None
    smtputf8: bool = False
    rcpts: list[Recipient] = field(default_factory=list)
    unknown_commands: int = 0
    protocol_errors: int = 0  # replies 500-504 so far
    closed: bool = False

    def reset_transaction(self) -> None:
        self.mail_from = None
        self.smtputf8 = False
        self.rcpts = []

    def reset_after_tls(self) -> None:
        """RFC 3207 4.2: everything learnt before the handshake is forgotten."""
        self.reset_transaction()
        self.greeting = None
        self.user = None
        self.tls = True

    @property
    def may_send(self) -> bool:
        return self.user is not None or self.trusted


Then = Callable[[SessionState, Reply], None]


def _nothing(state: SessionState, reply: Reply) -> None:
    return None


@dataclass(frozen=True)
class Expectation:
    """Allowed reply codes, each with the enhanced code required (None: any or none;
    `a|b`: either), and what happens to the session after each."""

    allowed: dict[int, str | None]
    then: dict[int, Then] = field(default_factory=dict)
    why: str = ""

    def check(self, state: SessionState, reply: Reply, command: str) -> None:
        """Fail unless `reply` is allowed; then move `state` on."""
        if reply.code not in self.allowed:
            raise AssertionError(
                f"{command!r} got {reply}; allowed {sorted(self.allowed)} ({self.why})"
            )
        enhanced = self.allowed[reply.code]
        if enhanced is not None and reply.enhanced not in enhanced.split("|"):
            raise AssertionError(f"{command!r} got {reply}; wanted enhanced code {enhanced}")
        self.then.get(reply.code, _nothing)(state, reply)


def _closes(state: SessionState, reply: Reply) -> None:
    state.closed = True


def route_for(domain: str) -> str | None:
    """The route the fuzz relay's config picks for a recipient domain."""
    return ROUTES.get(domain.lower().rstrip("."))


def expect_ehlo(state: SessionState, verb: str, name: str) -> Expectation:
    """HELO/EHLO: 501 without a name, else 250 and a fresh transaction."""
    if not name.strip():
        return Expectation({501: None}, why="no host name")

    def greeted(state: SessionState, reply: Reply) -> None:
        state.reset_transaction()
        state.greeting = verb
        state.helo_name = name.strip()
        if verb == "EHLO":
            keywords = {line.split()[0] for line in reply.lines[1:] if line}
            assert reply.lines[0].startswith(RELAY_HOSTNAME), reply
            offers_tls = not state.tls and not state.implicit_tls
            assert ("STARTTLS" in keywords) == offers_tls, f"STARTTLS offer wrong: {reply}"
            # AUTH only after TLS (RFC 4954 4: no plaintext passwords).
            assert ("AUTH" in keywords) == (state.tls or state.implicit_tls), reply
            assert "SIZE" in keywords, reply

    return Expectation({250: None}, {250: greeted})


def expect_mail(
    state: SessionState,
    sender: str | None,
    params: list[str],
    *,
    limits: Limits,
    address_ok: bool,
    refusal: tuple[int, str] | None = None,
) -> Expectation:
    """MAIL FROM. `sender` is the address when the model knows it is valid (None for a
    hostile one); `address_ok` says the argument is a well-formed path; `refusal` is the
    exact reply the model requires for a hostile address (a flagged input class)."""
    refused_syntax: dict[int, str | None] = {501: None, 553: None, 555: None}
    if state.greeting is None:
        return Expectation({503: None}, why="no HELO")
    if not address_ok:
        return Expectation(refused_syntax, why="malformed sender path")
    if state.greeting == "HELO" and params:
        # Before nesting: MAIL parameters (AUTH= too) are service extensions, which only
        # EHLO opens (RFC 5321 4.1.1.11).
        return Expectation({501: None}, why="parameters after HELO")
    if state.mail_from is not None:
        return Expectation({503: None}, why="nested MAIL")
    verdict = _mail_params(params, state.greeting == "EHLO", limits)
    if verdict is not None:
        return Expectation(verdict, why=f"bad MAIL parameters {params}")
    if refusal is not None:  # the handler's first check, before authentication
        return Expectation({refusal[0]: refusal[1]}, why="flagged hostile sender")
    if not state.may_send:
        return Expectation({530: "5.7.0"}, why="not authenticated")
    assert sender is not None
    if state.user == "bob" and (sender in ("", "<>") or _domain(sender) != BOB_DOMAIN):
        return Expectation({553: "5.7.1"}, why="bob may only send as example.com")
    smtputf8 = any(p.upper() == "SMTPUTF8" for p in params)

    def opened(state: SessionState, reply: Reply) -> None:
        state.mail_from = sender
        state.smtputf8 = smtputf8
        state.rcpts = []

    return Expectation({250: "2.1.0"}, {250: opened}, why="valid MAIL")


def _mail_params(params: list[str], extended: bool, limits: Limits) -> dict[int, str | None] | None:
    """None when the parameters are acceptable, else the refusals allowed."""
    if not params:
        return None
    if not extended:
        return {501: None} if any(_keyword(p) != "AUTH" for p in params) else None
    seen: set[str] = set()
    for param in params:
        key, eq, value = param.upper().partition("=")
        if not key.isalnum() or (eq and not value) or key in seen:
            return {501: None, 555: None}
        seen.add(key)
        if key == "SIZE":
            if not value.isdigit():
                return {501: None}
            if int(value) > limits.max_message_size:
                return {552: "5.3.4", 501: None, 555: None}
        elif key == "BODY":
            if value not in ("7BIT", "8BITMIME"):
                return {501: None, 555: None}
        elif key == "SMTPUTF8":
            if eq:
                return {501: None, 555: None}
        elif key == "AUTH":
            # RFC 4954 5: an AUTH= parameter is accepted and may be ignored.
            if not value:
                return {501: None, 555: None}
        else:
            return {555: None, 501: None}
    return None


def _keyword(param: str) -> str:
    return param.partition("=")[0].upper()


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def expect_rcpt(
    state: SessionState,
    address: str | None,
    params: list[str],
    *,
    limits: Limits,
    address_ok: bool,
    refusal: tuple[int, str] | None = None,
    raw: str = "",
) -> Expectation:
    """RCPT TO; arguments as for `expect_mail` (`address` None: a hostile but printable
    path the relay may take or refuse; if it takes it, it must deliver it)."""
    if state.greeting is None:
        return Expectation({503: None}, why="no HELO")
    if state.mail_from is None:
        return Expectation({503: None}, why="no MAIL")
    refused: dict[int, str | None] = {501: None, 553: None, 555: None, 550: "5.7.1"}
    if params:
        # An unusual path may take the parameters for its address: then it is refused
        # as an address; never taken, as no RCPT parameter is supported.
        allowed = dict(refused) if address is None or not address_ok else {}
        allowed.update({501: None, 555: None})
        return Expectation(allowed, why="RCPT parameters")
    if refusal is not None:  # the handler's first check
        return Expectation({refusal[0]: refusal[1]}, why="flagged hostile recipient")
    if not address_ok:
        return Expectation(refused, why="malformed recipient path")
    if address is None:
        # Printable but unusual (quoted, routed, bracketed...): refused, or taken and
        # then delivered like any other (the ledger checks that).
        def taken(state: SessionState, reply: Reply) -> None:
            route = route_for(_domain(raw.strip("<> ")))
            assert route is not None, f"250 for {raw!r}, which no route takes"
            state.rcpts.append(Recipient(None, route))

        allowed = dict(refused)
        allowed[250] = "2.1.5"
        if len(state.rcpts) >= limits.max_recipients:
            allowed[452] = "4.5.3"
            del allowed[250]
        return Expectation(allowed, {250: taken}, why="unusual path")
    if len(state.rcpts) >= limits.max_recipients:
        return Expectation({452: "4.5.3"}, why="too many recipients")
    route = route_for(_domain(address))
    if route is None:
        return Expectation({550: "5.7.1"}, why="no route")

    def added(state: SessionState, reply: Reply) -> None:
        state.rcpts.append(Recipient(address, route))

    return Expectation({250: "2.1.5"}, {250: added}, why="valid RCPT")


def expect_data_command(state: SessionState, arg: str = "") -> Expectation:
    """DATA itself: 354 when a recipient was taken."""
    if state.greeting is None:
        return Expectation({503: None}, why="no HELO")
    if not state.rcpts:
        return Expectation({503: None}, why="no recipient")
    if arg:
        return Expectation({501: None}, why="DATA with an argument")
    return Expectation({354: None}, why="recipients taken")


def expect_auth_result(state: SessionState, user: str | None) -> Expectation:
    """The reply that ends an AUTH exchange: right credentials of `user`, or wrong ones."""
    if user is not None:

        def in_(state: SessionState, reply: Reply) -> None:
            state.user = user

        return Expectation({235: "2.7.0"}, {235: in_}, why="right credentials")

    def failed(state: SessionState, reply: Reply) -> None:
        state.auth_failures += 1

    # The relay closes a session after repeated failures (and may throttle a client
    # address that keeps failing): 421 4.7.0, then the connection ends.
    return Expectation(
        {535: "5.7.8", 421: None}, {535: failed, 421: _closes}, why="wrong credentials"
    )


# -- DATA bodies ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One DATA section: `content` as the client means it, and the wire bytes after the
    354 (dot-stuffed unless `stuff` is off, then CRLF.CRLF)."""

    content: bytes
    stuff: bool = True

    def __repr__(self) -> str:
        head = self.content[:60] + (b"..." if len(self.content) > 60 else b"")
        return f"Body({len(self.content)} bytes {head!r}, stuff={self.stuff})"

    @property
    def wire(self) -> bytes:
        data = self.content
        if self.stuff:
            data = re.sub(rb"(?m)(?<=\r\n)\.", b"..", data)
            if data.startswith(b"."):
                data = b"." + data
        if data and not data.endswith(b"\r\n"):
            data += b"\r\n"
        return data + b".\r\n"

    @property
    def stored(self) -> bytes:
        """What the relay must store: the wire bytes with the terminator removed and
        dot-stuffing undone (RFC 5321 4.5.2)."""
        data = self.wire[:-3]
        if data.startswith(b"."):
            data = data[1:]
        return data.replace(b"\r\n.", b"\r\n")

    def outcome(self, limits: Limits) -> dict[int, str | None]:
        """The final reply allowed for this body."""
        wire = self.wire[:-3]
        lines = wire.split(b"\r\n")[:-1] if wire else []
        too_long = any(len(line) + 2 > limits.line_length_limit for line in lines)
        too_big = len(wire) > limits.max_message_size
        if too_long or too_big:
            allowed: dict[int, str | None] = {}
            if too_long:
                allowed[500] = None
            if too_big:
                allowed[552] = "5.3.4"
            return allowed
        if _received_count(self.stored) > limits.max_received_headers:
            return {554: "5.4.6"}
        return {250: "2.0.0"}


def _received_count(data: bytes) -> int:
    if data.startswith(b"\r\n"):
        return 0
    head = data.split(b"\r\n\r\n", 1)[0]
    return sum(1 for line in head.split(b"\r\n") if line[:9].lower() == b"received:")


def normalized(data: bytes) -> bytes:
    """Line endings as an SMTP upstream must get them: every CR, LF or CRLF as CRLF."""
    data = _LINE_ENDINGS.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


# -- what must reach the upstreams -------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedMessage:
    """A message that got 250 after DATA: who sent it and what each route must get."""

    queue_id: str
    mail_from: str
    recipients: tuple[Recipient, ...]
    stored: bytes
    helo: str
    peer: str
    protocol: str
    victim: bool = False

    def routes(self) -> dict[str, list[Recipient]]:
        out: dict[str, list[Recipient]] = {}
        for rcpt in self.recipients:
            out.setdefault(rcpt.route, []).append(rcpt)
        return out


def queue_id_of(reply: Reply) -> str:
    """The queue id in a `250 2.0.0 Ok: queued as ID` reply."""
    match = _QUEUED.search(reply.text)
    assert match is not None, f"no queue id in {reply}"
    return match[1]


def protocol_of(state: SessionState) -> str:
    """The `with` keyword of our Received header (RFC 3848)."""
    base = "UTF8SMTP" if state.smtputf8 else "ESMTP" if state.greeting == "EHLO" else "SMTP"
    tls = state.tls or state.implicit_tls
    return base + ("S" if tls else "") + ("A" if state.user is not None else "")


def sanitized_helo(name: str) -> str:
    """The HELO name as our Received header must show it (no header injection)."""
    return _HELO_UNSAFE.sub("?", name)[:255] or "unknown"


class Ledger:
    """Every message that got 250 after DATA, checked against what the upstreams got."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.expected: dict[str, ExpectedMessage] = {}
        self._checked: set[tuple[str, str]] = set()

    def accepted(self, message: ExpectedMessage) -> None:
        with self._lock:
            assert message.queue_id not in self.expected, f"queue id reused: {message.queue_id}"
            self.expected[message.queue_id] = message

    def missing(self, delivered: Iterable[tuple[str, bytes]]) -> set[tuple[str, str]]:
        """(queue id, route) pairs accepted but not delivered yet."""
        seen = {(route, _queue_id_in(data)) for route, data in delivered}
        with self._lock:
            wanted = {(q, r) for q, m in self.expected.items() for r in m.routes()}
        return {(q, r) for q, r in wanted if (r, q) not in seen}

    def check(self, delivered: list[tuple[str, str, tuple[str, ...], bytes]]) -> int:
        """Check every upstream record (route, mail_from, rcpt_tos, data); returns how
        many were checked now. Fails on a message nobody got a 250 for, a duplicate, or
        a wrong envelope or byte."""
        per_key: Counter[tuple[str, str]] = Counter()
        rcpts: dict[tuple[str, str], list[str]] = {}
        fresh = 0
        for route, mail_from, rcpt_tos, data in delivered:
            queue_id = _queue_id_in(data)
            with self._lock:
                message = self.expected.get(queue_id)
            assert message is not None, (
                f"{route} got a message no client got 250 for (id {queue_id}): {data[:300]!r}"
            )
            key = (queue_id, route)
            per_key[key] += 1
            rcpts.setdefault(key, []).extend(rcpt_tos)
            if key in self._checked:
                continue
            fresh += 1
            _check_bytes(message, data, rcpt_tos)
            assert message.mail_from == UNKNOWN or _null(mail_from) == _null(message.mail_from), (
                f"{queue_id}: sender {mail_from!r}, wanted {message.mail_from!r}"
            )
        for key, count in per_key.items():
            queue_id, route = key
            wanted = self.expected[queue_id].routes().get(route)
            assert wanted is not None, f"{queue_id} went to {route}, which none of its rcpts use"
            got = sorted(rcpts[key])
            assert len(got) == len(wanted), f"{queue_id} via {route}: rcpts {got}, wanted {wanted}"
            exact = sorted(r.address for r in wanted if r.address is not None)
            assert all(a in got for a in exact), f"{queue_id} via {route}: {got} lacks {exact}"
            # One copy per route: a message delivered twice is a duplicate for its readers.
            assert count == 1 or len(set(got)) == len(got), f"{queue_id} delivered {count}x"
            self._checked.add(key)
        return fresh


def _null(address: str) -> str:
    return "" if address in ("", "<>") else address


def _queue_id_in(data: bytes) -> str:
    match = _RECEIVED.match(data)
    assert match is not None, f"delivered message does not start with our Received: {data[:300]!r}"
    return match["qid"].decode()


def _check_bytes(message: ExpectedMessage, data: bytes, rcpt_tos: tuple[str, ...]) -> None:
    match = _RECEIVED.match(data)
    assert match is not None
    assert match["helo"].decode() == sanitized_helo(message.helo), (match["helo"], message.helo)
    assert match["peer"].decode() == message.peer
    assert match["by"].decode() == RELAY_HOSTNAME
    assert match["proto"].decode() == message.protocol, (match["proto"], message.protocol)
    parsedate_to_datetime(match["date"].decode())  # a valid RFC 5322 date
    if match["for"] is not None:  # only for a single recipient (as parsed, if unusual)
        assert len(message.recipients) == 1, (match["for"], message.recipients)
        rcpt = message.recipients[0].address
        assert rcpt is None or match["for"].decode() == rcpt, (match["for"], rcpt)
    body = data[match.end() :]
    wanted = normalized(message.stored) if message.stored else b""
    assert body == wanted or (not message.stored and body in (b"", b"\r\n")), (
        f"{message.queue_id}: body differs\n got  {body[:400]!r}\n want {wanted[:400]!r}"
    )
