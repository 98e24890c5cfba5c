"""One rule, three judges: the operator's model, the relay's config model and the CRD's CEL
rules must agree on every upstream.

Generated MailRoute upstreams (every provider; endpoint URLs of every shape: schemes,
address literals, local and metadata hosts, credentials, ports, paths, queries, fragments,
non-ASCII hosts, empty parts; region and domain per provider; the local-endpoint opt-in;
SMTP hosts, ports and TLS modes) go to

(a) ``MailRouteSpec`` (the operator's pydantic model),
(b) the relay's ``RelayConfig``, through ``relay_config.build_relay_config`` as the operator
    renders it, and the relay's ``ApiUpstream`` fed the same fields directly,
(c) for a fixed sample, the real kube-apiserver with the generated CRD (server dry run).

What the operator accepts the relay accepts; what the relay refuses the operator refuses,
with the same words; the API server accepts exactly what the operator accepts.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mailrelay.operator import models, relay_config
from mailrelay.operator.crdgen import build_crds, crd_filename
from mailrelay.relay import config as relay
from mailrelay.relay import upstream_rules
from mailrelay.support.localkube import LocalKube
from tests.crd.cases import BASE_RELAY_SPEC, CRD_DIR

# --- The shapes ---------------------------------------------------------------------------

SCHEMES = [
    "https://",
    "http://",
    "HTTPS://",
    "Http://",
    "ftp://",
    "https:/",
    "https:",
    "",
    " https://",
]
USERINFO = ["", "", "", "u@", "u:p@", "@", "127.0.0.1\\@", "127.0.0.1:80@"]
HOSTS = [
    "api.example.com", "hooks.svc.cluster.local", "example.com.", "xn--bcher-kva.example",
    "bücher.example", "EXAMPLE.com", "a_b.example", "-x.example", "a..b", "", ".",
    "10.0.0.5", "192.0.2.1", "169.255.0.1", "100.100.100.201", "127.1", "2130706433",
    "127.0.0.1", "127.255.255.254", "127.0.0.1.", "0.0.0.0", "169.254.169.254",
    "100.100.100.200", "127.000.0.1", "[::1]", "[::]", "[fe80::1]", "[FE80::1]",
    "[fd00:ec2::254]", "[fd00:ec2::253]", "[2001:db8::1]", "[::ffff:127.0.0.1]",
    "[::ffff:8.8.8.8]", "[::1.2.3.4]", "[fe80::1%25eth0]", "[1.2.3.4]", "[v1.x]", "[::1",
    "::1", "[1:2]", "localhost", "LocalHost", "localhost.", "localhost..", "api.localhost",
    "api.localhost.", "notlocalhost.example", "metadata.google.internal",
    "METADATA.GOOGLE.INTERNAL.", "metadata.goog", "%6c%6fcalhost", "local%20host",
    "exa mple.com", "exa\tmple.com", "ex{ample}.com", "İ.example",
    "\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54",  # fullwidth localhost
]  # fmt: skip
PORTS = ["", "", ":", ":0", ":1", ":80", ":8443", ":65535", ":65536", ":99999", ":000080", ":abc"]
PATHS = [
    "",
    "",
    "/",
    "/v3/mg.example.com/messages.mime",
    "/a b",
    "/%zz",
    "/%41",
    "\\x",
    "/ü",
    "/\n",
]
QUERIES = ["", "", "?x=1", "?", "?a=%2", "?q=a b"]
FRAGMENTS = ["", "", "#top", "#"]
REGIONS = [None, None, "us", "eu", "eu-west-1", "us-gov-west-1", "ap", "EU", "eu-west-1\n", "x"]
PROVIDERS = list(upstream_rules.PROVIDERS)


def endpoint_of(parts: tuple[str, str, str, str, str, str, str]) -> str:
    return "".join(parts)


def api_upstream(
    provider: str,
    endpoint: str | None = None,
    *,
    region: str | None = None,
    domain: str | None = None,
    stream: str | None = None,
    config_set: str | None = None,
    credentials: bool = True,
    allow_local: bool | None = None,
    signing_keys: list[str] | None = None,
    active_key: str | None = None,
) -> dict[str, Any]:
    api: dict[str, Any] = {"provider": provider}
    if signing_keys is not None:
        api["signingKeys"] = [
            {"id": key_id, "secretKey": f"hmac-{n}"} for n, key_id in enumerate(signing_keys)
        ]
    for key, value in (
        ("endpoint", endpoint),
        ("region", region),
        ("domain", domain),
        ("messageStream", stream),
        ("configurationSet", config_set),
        ("insecureAllowLocalEndpoint", allow_local),
        ("activeSigningKey", active_key),
    ):
        if value is not None:
            api[key] = value
    if credentials:
        api["credentialsSecretRef"] = {"name": "k"}
    return {"api": api}


def hook(endpoint: str) -> dict[str, Any]:
    """A webhook upstream (with its signing Secret) posting to ``endpoint``."""
    return api_upstream("webhook", endpoint)


def mostly(usual: str | None, odd: list[Any]) -> st.SearchStrategy[Any]:
    """The usual value three times in four, else one of the odd ones: a generated case then
    differs from a valid one in a part or two, which is where rules disagree."""
    return st.one_of(st.just(usual), st.just(usual), st.just(usual), st.sampled_from(odd))


endpoints = st.one_of(
    st.tuples(
        mostly("https://", SCHEMES),
        mostly("", USERINFO),
        mostly("hooks.example.org", HOSTS),
        mostly("", PORTS),
        mostly("/in", PATHS),
        mostly("", QUERIES),
        mostly("", FRAGMENTS),
    ).map(endpoint_of),
    st.text(max_size=40).map(lambda tail: f"https://{tail}"),
)
USUAL_REGION = {"ses": "eu-west-1", "sendgrid": "eu"}
KEY_IDS = ["2026-12", "k2", "a", "a.b", "-x", "x" * 63, "x" * 64, "", "ü", "2026_12"]
signing_keys = mostly(None, [[], ["2026-12"], ["2026-12", "k2"], ["k2", "k2"], ["a", "b", "c"]])


@st.composite
def api_upstreams(draw: st.DrawFn) -> dict[str, Any]:
    provider = draw(st.sampled_from(PROVIDERS))
    needs_endpoint = provider == "webhook"
    return api_upstream(
        provider,
        draw(endpoints if needs_endpoint else st.none() | endpoints),
        region=draw(mostly(USUAL_REGION.get(provider), REGIONS)),
        domain=draw(
            mostly("mg.example.com" if provider == "mailgun" else None, [None, "Mg.Example.com"])
        ),
        stream=draw(mostly(None, ["broadcast"])),
        config_set=draw(mostly(None, ["events"])),
        credentials=draw(mostly(provider, [None])) is not None,
        allow_local=draw(st.sampled_from([None, False, True])),
        signing_keys=draw(signing_keys | st.lists(st.sampled_from(KEY_IDS), max_size=3)),
        active_key=draw(mostly(None, [*KEY_IDS, "2026-12", "k2"])),
    )


SMTP_HOSTS = [
    "smtp.example.net", "127.0.0.1", "2001:db8::25", "::ffff:192.0.2.1", "fe80::1%eth0",
    "[2001:db8::25]", "-smtp.example.net", "smtp.example.net\n", "", "smtp_host", "bücher.example",
]  # fmt: skip


def smtp_upstream(host: str, port: Any, tls: str | None, plaintext: bool | None) -> dict[str, Any]:
    smtp: dict[str, Any] = {"host": host, "port": port}
    if tls is not None:
        smtp["tls"] = tls
    if plaintext is not None:
        smtp["insecureAllowPlaintext"] = plaintext
    return {"smtp": smtp}


smtp_upstreams = st.builds(
    smtp_upstream,
    host=st.sampled_from(SMTP_HOSTS),
    port=st.sampled_from([0, 1, 25, 465, 587, 65535, 65536]),
    tls=st.sampled_from([None, "starttls", "implicit", "none", "ssl"]),
    plaintext=st.sampled_from([None, False, True]),
)


def oauth_upstream(
    endpoint: str, grant: str = "refresh_token", allow_local: bool | None = None
) -> dict[str, Any]:
    """An SMTP upstream with OAuth2 (the token endpoint is held to the endpoint rules)."""
    oauth: dict[str, Any] = {"grant": grant, "tokenEndpoint": endpoint, "secretRef": {"name": "g"}}
    if allow_local is not None:
        oauth["insecureAllowLocalEndpoint"] = allow_local
    return {"smtp": {"host": "smtp.example.net", "oauth2": oauth}}


oauth_upstreams = st.builds(
    oauth_upstream,
    endpoint=endpoints,
    grant=st.sampled_from(["refresh_token", "client_credentials"]),
    allow_local=st.sampled_from([None, False, True]),
)


# --- The judges ---------------------------------------------------------------------------


def route_spec(upstream: dict[str, Any]) -> dict[str, Any]:
    return {"relayRef": {"name": "outbound"}, "upstream": upstream}


def operator_verdict(upstream: dict[str, Any]) -> tuple[models.MailRouteSpec | None, str]:
    try:
        return models.MailRouteSpec.model_validate(route_spec(upstream)), ""
    except ValidationError as error:
        return None, str(error)


def rendered_relay_problem(spec: models.MailRouteSpec) -> str | None:
    """What the relay says of the config the operator renders for this route."""
    try:
        relay_config.build_relay_config(
            name="outbound",
            namespace="mail",
            spec=models.MailRelaySpec.model_validate(BASE_RELAY_SPEC),
            routes=[relay_config.BoundRoute("r", spec)],
        )
    except relay_config.RelayConfigError as error:
        return str(error)
    return None


def direct_relay_problem(api: dict[str, Any]) -> str | None:
    """The relay's own verdict on the same fields, written as the relay's YAML would."""
    data: dict[str, Any] = {"type": "api", "name": "u", "provider": api["provider"]}
    for key in ("endpoint", "region", "domain", "messageStream", "configurationSet"):
        if key in api:
            data[re.sub("([A-Z])", r"_\1", key).lower()] = api[key]
    if api.get("insecureAllowLocalEndpoint"):
        data["insecure_allow_local_endpoint"] = True
    if "signingKeys" in api:
        data["signing_keys"] = [k["id"] for k in api["signingKeys"]]
    if "activeSigningKey" in api:
        data["active_signing_key"] = api["activeSigningKey"]
    try:
        relay.ApiUpstream.model_validate(data)
    except ValidationError as error:
        return str(error)
    return None


def direct_oauth_problem(oauth: dict[str, Any]) -> str | None:
    """The relay's own verdict on an OAuth2 section, as the relay's YAML would write it."""
    data: dict[str, Any] = {
        "grant": oauth["grant"],
        "token_endpoint": oauth["tokenEndpoint"],
        "client_id_file": "/o/client_id",
        "client_secret_file": "/o/client_secret",
        "insecure_allow_local_endpoint": bool(oauth.get("insecureAllowLocalEndpoint")),
    }
    if oauth["grant"] == "refresh_token":
        data["refresh_token_file"] = "/o/refresh_token"
    try:
        relay.OAuth2Config.model_validate(data)
    except ValidationError as error:
        return str(error)
    return None


def rule_words(words: upstream_rules.Messages) -> dict[str, str]:
    """Each rule's message, less a leading "endpoint" (a refusal may name the host there)."""
    return {
        key: re.sub(r"^endpoint:? ", "", value)
        for key, value in vars(words).items()
        if not key.startswith("_")
    }


RELAY_WORDS = rule_words(upstream_rules.messages())
OPERATOR_WORDS = rule_words(models._WORDS)
RULE_WORDS = set(RELAY_WORDS.values())


def relay_rule(problem: str) -> str | None:
    """The rule (its words) a relay refusal names, if it is one of the provider rules."""
    found = [words for words in RULE_WORDS if words in problem]
    return max(found, key=len) if found else None


def check_agreement(upstream: dict[str, Any]) -> None:
    spec, operator_error = operator_verdict(upstream)
    if spec is not None:
        assert rendered_relay_problem(spec) is None, (upstream, rendered_relay_problem(spec))
    oauth = upstream.get("smtp", {}).get("oauth2")
    if oauth is not None:
        problem = direct_oauth_problem(oauth)
        assert (problem is None) == (spec is not None), (upstream, problem, operator_error)
        rule = relay_rule(problem) if problem is not None else None
        if rule is not None:
            key = next(k for k, w in RELAY_WORDS.items() if w == rule)
            assert OPERATOR_WORDS[key] in operator_error, (upstream, problem, operator_error)
    if "api" in upstream and isinstance(upstream["api"].get("provider"), str):
        if upstream["api"]["provider"] not in upstream_rules.PROVIDERS:
            return
        problem = direct_relay_problem(upstream["api"])
        if problem is not None:
            assert spec is None, f"the relay refuses what the operator accepts: {problem}"
            rule = relay_rule(problem)
            if rule is not None and any(w in operator_error for w in OPERATOR_WORDS.values()):
                # Same rule, same words (field names spelled for a MailRoute).
                key = next(k for k, w in RELAY_WORDS.items() if w == rule)
                assert OPERATOR_WORDS[key] in operator_error, (upstream, problem, operator_error)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(api_upstreams())
def test_operator_and_relay_agree_on_api_upstreams(upstream: dict[str, Any]) -> None:
    check_agreement(upstream)


@settings(max_examples=150, deadline=None)
@given(smtp_upstreams)
def test_operator_and_relay_agree_on_smtp_upstreams(upstream: dict[str, Any]) -> None:
    check_agreement(upstream)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(oauth_upstreams)
def test_operator_and_relay_agree_on_oauth2_token_endpoints(upstream: dict[str, Any]) -> None:
    check_agreement(upstream)


def test_oauth2_and_a_password_are_exclusive() -> None:
    upstream = oauth_upstream("https://oauth2.googleapis.com/token")
    upstream["smtp"]["credentialsSecretRef"] = {"name": "p"}
    spec, error = operator_verdict(upstream)
    assert spec is None and models.SMTP_OAUTH2_PASSWORD_MESSAGE in error


# Found by the tests above on the code before relay/upstream_rules.py; each names what went
# wrong and stays as a fixed case.
FOUND: list[tuple[dict[str, Any], bool]] = [
    # The operator accepted, the relay refused: a case-insensitive scheme and a leading space
    # (urlsplit strips it) against the relay's startswith("https://").
    (hook("HTTPS://hooks.example.org/"), True),
    (hook(" https://hooks.example.org/"), False),
    # Both accepted what no HTTP client can use: a port out of range or not a number.
    (hook("https://hooks.example.org:99999/"), False),
    (hook("https://hooks.example.org:abc/"), False),
    (hook("https://hooks.example.org:0/"), False),
    # urlsplit drops tabs and newlines silently; Go's url.Parse refuses them.
    (hook("https://hooks.exa\tmple.org/"), False),
    (hook("https://hooks.example.org/in\n"), False),
    # Credentials in the spec (and in the ConfigMap): refused, they belong in the Secret.
    (hook("https://u:p@hooks.example.org/"), False),
    # Parsers disagree on the host: a backslash, a %-escaped host, a bracketed non-address.
    (hook("http://127.0.0.1\\@hooks.example.org/"), False),
    (hook("http://%6c%6fcalhost/"), False),
    (hook("http://[v1.x]/"), False),
    (hook("http://[1.2.3.4]/"), False),
    # CEL's isURL refused a fragment right after the host; pydantic accepted it.
    (hook("https://hooks.example.org#top"), False),
    # An address with a trailing dot is still that address (netguard strips it, CEL did not).
    (hook("http://127.0.0.1./"), False),
    (hook("http://api.localhost./"), False),
    # The relay took a region or a stream a provider never reads, and any SES region.
    (api_upstream("postmark", region="eu"), False),
    (api_upstream("ses", region="Europe", credentials=False), False),
    (api_upstream("resend", stream="broadcast"), False),
    (api_upstream("sendgrid", config_set="events"), False),
    (api_upstream("sendgrid", domain="mg.example.com"), False),
    (hook("https://bücher.example/in"), True),
    (hook("https://[2001:db8::1]:8443/in?x=1"), True),
    # SMTP: CEL's isIP refuses a zone and an IPv4-mapped address; pydantic accepted both.
    (smtp_upstream("fe80::1%eth0", 25, None, None), False),
    (smtp_upstream("::ffff:192.0.2.1", 25, None, None), False),
    (smtp_upstream("2001:db8::25", 25, None, None), True),
]  # fmt: skip


@pytest.mark.parametrize(("upstream", "accepted"), FOUND)
def test_found_disagreements_stay_fixed(upstream: dict[str, Any], accepted: bool) -> None:
    spec, error = operator_verdict(upstream)
    assert (spec is not None) is accepted, error
    check_agreement(upstream)


def test_relay_refuses_the_same_endpoints_with_the_same_words() -> None:
    for endpoint, words in [
        ("HTTP://hooks.example.org:99999/", "the port must be between 1 and 65535"),
        ("https://u:p@hooks.example.org/", "no user@ credentials"),
        ("http://[::ffff:8.8.8.8]/", "without a %zone and not in the IPv4-mapped form"),
        ("http://LOCALHOST./x", "endpoint host 'LOCALHOST.' is a name of this machine"),
        ("http://169.254.169.254/", "set insecure_allow_local_endpoint: true"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(words)):
            relay.ApiUpstream.model_validate(
                {"type": "api", "name": "u", "provider": "webhook", "endpoint": endpoint}
            )


# --- The API server, on a fixed sample ------------------------------------------------------


def signing_sample(pick: random.Random, provider: str) -> dict[str, Any]:
    """Signing keys on a third of the webhooks (and on a few other providers), valid or not."""
    if pick.random() > (0.35 if provider == "webhook" else 0.03):
        return {}
    keys = pick.choice([["k1"], ["k1", "k2"], ["k1", "k2"], ["k1", "k1"], ["a.b"], ["k1", "-x"]])
    return {"signing_keys": keys, "active_key": pick.choice([None, "k1", "k2", "k2", "k3"])}


def cel_sample(count: int) -> list[dict[str, Any]]:
    """A reproducible sample across every list above, plus the fixed cases."""
    pick = random.Random(12)
    sample = [upstream for upstream, _ in FOUND]
    for _ in range(count):
        endpoint = endpoint_of(
            (
                pick.choice(SCHEMES),
                pick.choice(USERINFO),
                pick.choice(HOSTS),
                pick.choice(PORTS),
                pick.choice(PATHS),
                pick.choice(QUERIES),
                pick.choice(FRAGMENTS),
            )
        )
        provider = pick.choice(PROVIDERS)
        sample.append(
            api_upstream(
                provider,
                endpoint if provider == "webhook" or pick.random() < 0.5 else None,
                region=pick.choice(REGIONS) if pick.random() < 0.3 else None,
                domain="mg.example.com" if provider == "mailgun" else None,
                allow_local=pick.choice([None, True]),
                **signing_sample(pick, provider),
            )
        )
    # Odd characters in odd places, as the hypothesis text tail does.
    pool = "aZ09-._~:/?#[]@!$&'()*+,;=% \\\t\x7fü\u3000\uff4c"
    sample += [
        hook("https://" + "".join(pick.choice(pool) for _ in range(pick.randint(1, 12))))
        for _ in range(count // 4)
    ]
    sample += [smtp_upstream(host, 25, None, None) for host in SMTP_HOSTS]
    # Every signing-key rule, on both sides of it.
    sample += [
        api_upstream(provider, "https://hooks.example.org/in", signing_keys=keys, active_key=active)
        for provider, keys, active in [
            ("webhook", ["2026-12"], None),
            ("webhook", ["2026-11", "2026-12"], "2026-12"),
            ("webhook", ["2026-11", "2026-12"], None),
            ("webhook", ["2026-11", "2026-12"], "2027-01"),
            ("webhook", ["k", "k"], "k"),
            ("webhook", ["a.b"], None),
            ("webhook", [], "k"),
            ("webhook", [], None),
            ("resend", ["k"], None),
            ("resend", [], None),
            ("sendgrid", None, "k"),
        ]
    ]
    sample += [
        oauth_upstream(
            endpoint_of(
                (
                    pick.choice(SCHEMES),
                    pick.choice(USERINFO),
                    pick.choice(HOSTS),
                    pick.choice(PORTS),
                    pick.choice(PATHS),
                    "",
                    "",
                )
            ),
            pick.choice(["refresh_token", "client_credentials"]),
            pick.choice([None, True]),
        )
        for _ in range(count // 4)
    ]
    sample += [
        oauth_upstream("https://oauth2.googleapis.com/token"),
        oauth_upstream("http://oauth2.googleapis.com/token"),
        oauth_upstream("http://127.0.0.1:8080/token", allow_local=True),
        oauth_upstream(
            "https://login.microsoftonline.com/t/oauth2/v2.0/token", "client_credentials"
        ),
    ]
    return sample


@pytest.fixture(scope="module")
def crds(kube: LocalKube) -> LocalKube:
    kube.install_crds([CRD_DIR / crd_filename(crd) for crd in build_crds()])
    return kube


@pytest.fixture(scope="module")
def rules_namespace(crds: LocalKube) -> Iterator[str]:
    name = crds.create_namespace("t-upstream-rules")
    yield name
    crds.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.kube
def test_api_server_agrees_with_the_models(crds: LocalKube, rules_namespace: str) -> None:
    sample = cel_sample(160)
    items = [
        {
            "apiVersion": models.API_VERSION,
            "kind": "MailRoute",
            "metadata": {"name": f"rule-{index:03d}"},
            "spec": route_spec(upstream),
        }
        for index, upstream in enumerate(sample)
    ]
    # One kubectl for the whole sample: a List is applied object by object.
    result = crds.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        rules_namespace,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        check=False,
    )
    accepted = set(re.findall(r"mailroute\.mailrelay\.dev/(rule-\d+) created", result.stdout))
    errors = {
        name: line
        for line in result.stderr.splitlines()
        for name in re.findall(r'"(rule-\d+)" is invalid', line)
    }
    disagreements = []
    for index, upstream in enumerate(sample):
        name = f"rule-{index:03d}"
        spec, error = operator_verdict(upstream)
        if (spec is not None) != (name in accepted):
            disagreements.append((upstream, error or "accepted", errors.get(name, "accepted")))
        elif spec is None and name in errors:
            # The provider rule the model names, the API server names too.
            for words in OPERATOR_WORDS.values():
                if words in error:
                    assert words in errors[name], (upstream, words, errors[name])
    assert not disagreements, "\n".join(map(str, disagreements))
    assert len(accepted) + len(errors) == len(sample), result.stderr[-2000:]
    # The sample exercises both sides of the rules.
    assert len(accepted) > len(sample) // 5 and len(errors) > len(sample) // 5
