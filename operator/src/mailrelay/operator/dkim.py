"""DKIM for MailRoutes: which keys are usable, whether DNS publishes them, what to sign with.

Gather, decide, act, like the rest of the operator:

* gather: ``key_facts`` (pure) turns a watched Secret's data into the public facts of each
  value that is a private key (algorithm, size, public key) or the problem with it; the
  ``dkim_key_index`` in ``main`` keeps them, so no pass reads a Secret and no private key
  is kept. ``DnsChecker`` looks up each selector's TXT record with dnspython's asyncio
  resolver (``MAILRELAY_OPERATOR_DNS_RESOLVER`` picks the server), caching answers for
  ``dkim_dns_cache_seconds`` and keeping the last answer through a failed lookup, so a DNS
  outage does not take a signing route out of service.
* decide: ``judge_dkim`` (pure) makes the ``DKIMReady`` condition, the records for the
  status, and the selector each domain signs with: ``active`` when its record matches the
  key, else ``next`` when that one's does, else none: the route is then rendered *held*
  (``RouteConfig.held``: new mail 451 4.7.5, queued mail waits), not left out, since a
  broader route would send its mail unsigned. Nothing is signed with a key DNS lacks. A key
  that is not a usable key (not PEM, too short, wrong type) holds the route too.
* act: ``routes.py`` writes the condition, the records and the Events; ``relay_config.py``
  mounts both selectors' Secrets and names the chosen key in the relay's config.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver

from mailrelay.operator import models
from mailrelay.operator.conditions import ConditionUpdate
from mailrelay.relay import dkim

log = logging.getLogger(__name__)

DKIM_READY = "DKIMReady"

__all__ = [
    "DKIM_READY",
    "DkimChoice",
    "DkimVerdict",
    "DnsChecker",
    "KeyFacts",
    "TxtAnswer",
    "facts_of",
    "judge_dkim",
    "key_candidates",
    "key_facts",
    "record_names",
]


@dataclass(frozen=True)
class KeyFacts:
    """What the operator may know of a private key: public facts, or why it cannot sign."""

    algorithm: str | None = None
    bits: int = 0
    record: str | None = None  # the TXT value to publish
    public: str = ""
    problem: str | None = None

    @classmethod
    def of(cls, data: bytes) -> KeyFacts:
        """Facts of one Secret value (parsed here; only the public part is kept)."""
        try:
            key = dkim.parse_private_key(data)
        except dkim.KeyProblem as problem:
            return cls(problem=str(problem))
        return cls(key.algorithm, key.bits, dkim.txt_record(key), key.public)

    def matches(self, record: str) -> bool:
        """Whether a published TXT record carries this public key."""
        if self.algorithm is None:
            return False
        key = dkim.SigningKey(
            "rsa-sha256" if self.algorithm == "rsa-sha256" else "ed25519-sha256",
            self.bits,
            b"",
            self.public,
        )
        return dkim.record_matches(record, key)


def _looks_like_key(data: bytes) -> bool:
    text = data.strip()
    if text.startswith(b"-----BEGIN") and b"PRIVATE KEY" in text[:64]:
        return True
    try:
        return len(base64.b64decode(text, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def key_candidates(data: Mapping[str, str]) -> dict[str, bytes]:
    """The values of a Secret's ``data`` (base64) that are, or try to be, a private key:
    cheap, on the loop; ``facts_of`` parses them (a thread's work)."""
    out: dict[str, bytes] = {}
    for name, encoded in data.items():
        try:
            value = base64.b64decode(encoded or "", validate=True)
        except (binascii.Error, ValueError):
            continue
        if _looks_like_key(value):
            out[name] = value
    return out


def facts_of(candidates: Mapping[str, bytes]) -> dict[str, KeyFacts]:
    """Each candidate's public facts (CPU-bound: RSA keys are checked)."""
    return {name: KeyFacts.of(value) for name, value in candidates.items()}


def key_facts(data: Mapping[str, str]) -> dict[str, KeyFacts]:
    """``facts_of(key_candidates(data))``: what the index keeps of a Secret."""
    return facts_of(key_candidates(data))


# (Secret name, key) -> facts; None when the Secret or key is not known (ResolvedRefs says).
KeyLookup = Callable[[str, str], KeyFacts | None]


@dataclass(frozen=True)
class TxtAnswer:
    """The TXT records at a name (strings of each record joined), or why none could be read."""

    records: tuple[str, ...] = ()
    error: str | None = None


def record_names(spec: models.MailRouteSpec) -> list[str]:
    """Every TXT record name a route's DKIM check reads."""
    return [
        dkim.record_name(selector.selector, domain.domain)
        for domain in spec.dkim
        for _, selector in domain.selectors()
    ]


@dataclass
class DnsChecker:
    """Cached asynchronous TXT lookups against the configured resolver."""

    resolver_address: str | None = None  # host:port, or None for the system's resolvers
    cache_seconds: float = 60.0
    timeout_seconds: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _cache: dict[str, tuple[float, TxtAnswer]] = field(default_factory=dict)
    _good: dict[str, TxtAnswer] = field(default_factory=dict)
    _resolver: dns.asyncresolver.Resolver | None = None

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self.resolver_address:
                host, _, port = self.resolver_address.rpartition(":")
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [host.strip("[]")]
                resolver.port = int(port)
            else:
                resolver = dns.asyncresolver.Resolver()
            resolver.lifetime = self.timeout_seconds
            resolver.cache = None  # ours below keeps the last good answer through failures
            self._resolver = resolver
        return self._resolver

    def period(self) -> int:
        """The number of the current cache period (a pass input: see relays.pass_inputs)."""
        return int(self.clock() // self.cache_seconds)

    async def txt(self, name: str) -> TxtAnswer:
        """The TXT records at ``name`` (cached)."""
        now = self.clock()
        cached = self._cache.get(name)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        answer = await self._lookup(name)
        if answer.error is not None and name in self._good:
            log.warning(
                "Kept the last DKIM record seen at %s: the lookup failed (%s)", name, answer.error
            )
            answer = self._good[name]
        elif answer.error is None:
            self._good[name] = answer
        self._cache[name] = (now, answer)
        return answer

    async def lookup_all(self, names: Sequence[str]) -> dict[str, TxtAnswer]:
        """Every name's answer, looked up concurrently."""
        unique = sorted(set(names))
        answers = await asyncio.gather(*(self.txt(name) for name in unique))
        return dict(zip(unique, answers, strict=True))

    async def _lookup(self, name: str) -> TxtAnswer:
        try:
            answer = await self._get_resolver().resolve(name, "TXT", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return TxtAnswer()
        except (dns.exception.DNSException, OSError) as error:
            return TxtAnswer(error=f"{type(error).__name__}: {error}"[:300])
        records = tuple(
            b"".join(rdata.strings).decode("utf-8", errors="replace") for rdata in answer
        )
        return TxtAnswer(records)


@dataclass(frozen=True)
class DkimChoice:
    """What a domain signs with: goes into the relay's config."""

    domain: str
    selector: str
    secret: str
    key: str
    headers: tuple[str, ...] | None
    canonicalization: str


@dataclass(frozen=True)
class DkimVerdict:
    """The DKIM decision for one route in one pass."""

    condition: ConditionUpdate
    records: tuple[dict[str, Any], ...] = ()
    choices: tuple[DkimChoice, ...] = ()
    usable: bool = True  # False: the route is held (RouteConfig.held)


def _zone_line(name: str, record: str) -> str:
    """The record as a zone file line, split into 255-byte strings as DNS requires."""
    chunks = [record[i : i + 250] for i in range(0, len(record), 250)]
    return f"{name}. IN TXT ( {' '.join(chr(34) + c + chr(34) for c in chunks)} )"


def judge_dkim(
    spec: models.MailRouteSpec, keys: KeyLookup, answers: Mapping[str, TxtAnswer]
) -> DkimVerdict | None:
    """The route's DKIMReady condition and signing choices; None for a route that does not
    sign. Missing Secrets and keys are ResolvedRefs' to report: they count as not ready."""
    if not spec.dkim:
        return None
    records: list[dict[str, Any]] = []
    choices: list[DkimChoice] = []
    bad: list[str] = []
    unpublished: list[str] = []
    unchecked: list[str] = []
    fallbacks: list[str] = []
    for domain in spec.dkim:
        chosen: DkimChoice | None = None
        for role, selector in domain.selectors():
            ref = selector.secret_ref
            name = dkim.record_name(selector.selector, domain.domain)
            facts = keys(ref.name, ref.key)
            entry: dict[str, Any] = {
                "domain": domain.domain,
                "selector": selector.selector,
                "role": role,
                "name": name,
                "published": False,
                "signing": False,  # explicit: the API server would default it (a diff)
            }
            records.append(entry)
            if facts is None:
                unchecked.append(f"{role} selector {selector.selector!r} of {domain.domain}")
                continue
            if facts.problem is not None or facts.record is None:
                problem = facts.problem or "is not a private key"
                bad.append(
                    f"the {role} key of {domain.domain} (Secret {ref.name!r}, key {ref.key!r}) "
                    f"{problem}"
                )
                continue
            entry["record"] = facts.record
            answer = answers.get(name, TxtAnswer(error="not looked up"))
            if any(facts.matches(record) for record in answer.records):
                entry["published"] = True
                if chosen is None:
                    chosen = DkimChoice(
                        domain.domain,
                        selector.selector,
                        ref.name,
                        ref.key,
                        None if domain.headers is None else tuple(domain.headers),
                        domain.canonicalization,
                    )
                    entry["signing"] = True
                    if role == "next":
                        fallbacks.append(
                            f"{domain.domain} signs with next selector {selector.selector!r}"
                        )
                continue
            found = (
                f"the lookup failed ({answer.error})"
                if answer.error is not None
                else "DNS has no record there"
                if not answer.records
                else f"DNS has {len(answer.records)} record(s) there, none with this key"
            )
            unpublished.append(
                f"publish {_zone_line(name, facts.record)} for the {role} selector ({found})"
            )
        if chosen is not None:
            choices.append(chosen)
    if bad:
        condition = ConditionUpdate(
            DKIM_READY,
            "False",
            "DKIMKeyInvalid",
            "The route is held, so no mail goes out unsigned: "
            + "; ".join(bad)
            + ". Put a PEM RSA (2048 bits or more) or Ed25519 private key in the Secret.",
        )
        return DkimVerdict(condition, tuple(records), (), usable=False)
    if unchecked:
        condition = ConditionUpdate(
            DKIM_READY,
            "Unknown",
            "KeyNotResolved",
            "The key of the " + ", ".join(unchecked) + " is not readable yet; see ResolvedRefs.",
        )
        return DkimVerdict(condition, tuple(records), (), usable=False)
    signing_all = len(choices) == len(spec.dkim)
    if not signing_all:
        missing = [d.domain for d in spec.dkim if d.domain not in {c.domain for c in choices}]
        condition = ConditionUpdate(
            DKIM_READY,
            "False",
            "DNSRecordMissing",
            f"No selector of {', '.join(missing)} is published in DNS with its key, so the route "
            "is held (nothing is signed with a key DNS lacks, and nothing meant to be signed "
            "goes out unsigned): " + "; ".join(unpublished) + ".",
        )
        return DkimVerdict(condition, tuple(records), (), usable=False)
    if unpublished or fallbacks:
        condition = ConditionUpdate(
            DKIM_READY,
            "False",
            "DNSRecordMismatch",
            "Signing, but not every selector is published: "
            + "; ".join(fallbacks + unpublished)
            + ".",
        )
        return DkimVerdict(condition, tuple(records), tuple(choices))
    condition = ConditionUpdate(
        DKIM_READY,
        "True",
        "Published",
        "Every selector's DNS record matches its key; signing with "
        + ", ".join(f"{c.selector} for {c.domain}" for c in choices)
        + ".",
    )
    return DkimVerdict(condition, tuple(records), tuple(choices))
