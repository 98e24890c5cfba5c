"""Errors that speak human, and never quote a secret: config, users file, TLS, operator.

`--check-config`, hot reload and the operator's conditions all show validation problems
through one formatter (`mailrelay.relay.problems`): `field.path: message` lines, every
problem of a file at once, no pydantic internals and no input values.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from mailrelay.operator import models
from mailrelay.operator.relay_config import RelayConfigError, build_relay_config
from mailrelay.operator.routes import validation_message
from mailrelay.relay.auth import hash_password, load_users
from mailrelay.relay.config import ConfigError, parse_config
from mailrelay.relay.tlsfiles import tls_problem
from mailrelay.support.smtp_peers import TlsCerts
from tests.relay.conftest import RelayFactory
from tests.relay.test_reload import dead_route, wait_reloads

# Pydantic's words that must never reach a person.
INTERNALS = (
    "lax-or-strict",
    "function-",
    "json-or-python",
    "union[",
    "For further information",
    "errors.pydantic.dev",
    "input_value",
    "input_type",
    "IPv4Network",
    "IPv6Network",
    "SmtpUpstream",
    "ApiUpstream",
    "Input should",
    "Value error,",
)
SECRET_PLAIN = "Plaintext-Pass-8c1d2e"
SECRET_HASH_PREFIX = "$2b$12$SecretSaltPrefix77"

BASE: dict[str, Any] = {
    "hostname": "relay.test",
    "auth": {"required": False},
    "allowed_networks": ["10.0.0.0/8"],
    "spool": {"directory": "/var/spool/mailrelay"},
    "routes": [{"name": "out", "upstream": {"type": "smtp", "name": "mx", "host": "mx.test"}}],
}


def _problems(**changes: Any) -> str:
    with pytest.raises(ConfigError) as failed:
        parse_config(yaml.safe_dump({**BASE, **changes}), source="relay.yaml")
    text = str(failed.value)
    for word in INTERNALS:
        assert word not in text, f"{word!r} in:\n{text}"
    return text


def test_networks_say_what_is_wrong_and_what_was_meant() -> None:
    text = _problems(allowed_networks=["10.0.0.1/8", "fe80::1/10", "nonsense", 7, "192.168.2.0/24"])
    assert "allowed_networks[0]: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?" in text
    assert "allowed_networks[1]: fe80::1/10 has host bits set; did you mean fe80::/10?" in text
    assert "allowed_networks[2]: 'nonsense' is not a network" in text
    assert "allowed_networks[3]: must be a network in CIDR notation" in text
    assert "allowed_networks[4]" not in text
    assert "(4 problem(s))" in text


def test_every_problem_of_the_file_is_listed_at_once() -> None:
    """A bad domain pattern, a bad port and an unknown upstream type do not hide the
    repeated route name, the clashing upstream names or the AUTH rule."""
    routes = [
        {
            "name": "out",
            "match": {"sender_domains": ["bad domain!", "*.ok.test", "a.*.test"]},
            "upstream": {"type": "smtp", "name": "mx", "host": "mx.test", "port": "x"},
        },
        {"name": "out", "upstream": {"type": "pigeon"}},
        {"name": "other", "upstream": {"type": "smtp", "name": "mx2", "host": "elsewhere.test"}},
        {"name": "api", "upstream": {"type": "api", "name": "p", "provider": "carrier"}},
        {"name": "fifth", "upstream": {"type": "smtp", "name": "mx2", "host": "a.test"}},
    ]
    text = _problems(routes=routes, auth={"required": True}, colour="blue")
    expected = [
        "routes[0].match.sender_domains: 'bad domain!', 'a.*.test' are not domain patterns",
        "routes[0].upstream.port: must be a whole number",
        "routes[1].upstream.type: must be one of 'smtp', 'api'",
        "routes[3].upstream.provider: must be 'mailgun', 'ses'",
        "colour: is not a known setting",
        "routes[1].name: route name 'out' is already used by routes[0]",
        "routes[4].upstream.name: upstream name 'mx2' is used for two different upstreams",
        "auth.required: auth.required is true but auth.users_file is not set",
    ]
    for line in expected:
        assert f"  - {line}" in text, f"{line!r} missing from:\n{text}"
    assert "(8 problem(s))" in text


def test_missing_and_mistyped_fields_read_plainly() -> None:
    text = _problems(spool={}, listener={"tls": "yes", "workers": "many"}, routes="none")
    assert "spool.directory: is required" in text
    assert "listener.tls: must be a mapping of settings (key: value)" in text
    assert "listener.workers: must be a whole number" in text
    assert "routes: must be a list" in text


def _users(tmp_path: Path, users: Any, name: str = "users.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"users": users}))
    return path


def _planted_users(tmp_path: Path) -> Path:
    return _users(
        tmp_path,
        [
            {"username": "app", "password_hash": SECRET_PLAIN},
            {"username": "ops", "password_hash": SECRET_HASH_PREFIX},
            {"username": "app", "password_hash": hash_password("x"), "colour": SECRET_PLAIN},
            {"username": "svc", "password_hash": "$argon2id$v=19$m=65536" + SECRET_PLAIN},
            {"username": "old", "password_hash": hash_password("y"), "allowed_sender_domains": 5},
        ],
    )


def test_users_file_errors_list_everything_and_quote_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as failed:
        load_users(_planted_users(tmp_path))
    text = str(failed.value)
    assert SECRET_PLAIN not in text and "SecretSaltPrefix" not in text
    assert "$2b$12$" not in text
    for word in INTERNALS:
        assert word not in text
    for line in (
        "users[0].password_hash: must be a bcrypt hash",
        "users[1].password_hash: must be a bcrypt hash",
        "users[2].colour: is not a known setting",
        "users[3].password_hash: is not a well-formed argon2 hash",
        "users[4].allowed_sender_domains: must be a list",
        "users[2].username: username is already used by users[0]",
    ):
        assert line in text, f"{line!r} missing from:\n{text}"
    # Nor through the exception chain a traceback would print.
    assert failed.value.__cause__ is None and failed.value.__context__ is None


def test_a_users_file_that_is_not_yaml_shows_no_line_of_it(tmp_path: Path) -> None:
    path = tmp_path / "users.yaml"
    path.write_text(f'users:\n  - username: app\n    password_hash: "{SECRET_PLAIN}\n  - [x\n')
    with pytest.raises(ConfigError) as failed:
        load_users(path)
    assert SECRET_PLAIN not in str(failed.value)
    assert "line " in str(failed.value) and "column " in str(failed.value)


def _check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay.relay", "--config", str(config), "--check-config"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_check_config_lists_users_and_tls_problems_together_without_secrets(
    tmp_path: Path, tls_certs: TlsCerts
) -> None:
    _, other_key = tls_certs.issue(tmp_path, "other")
    config = tmp_path / "relay.yaml"
    data = {
        **BASE,
        "auth": {"required": True, "users_file": str(_planted_users(tmp_path))},
        "listener": {"tls": {"cert_file": str(tls_certs.cert_file), "key_file": str(other_key)}},
    }
    config.write_text(yaml.safe_dump(data))
    result = _check_config(config)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert SECRET_PLAIN not in output and "SecretSaltPrefix" not in output
    for word in INTERNALS:
        assert word not in output
    assert "users[0].password_hash" in output
    assert (
        f"the TLS key in {other_key} does not belong to the certificate in {tls_certs.cert_file}"
        in output
    )


def test_tls_problems_name_the_file_at_fault(tmp_path: Path, tls_certs: TlsCerts) -> None:
    missing = tmp_path / "missing.key"
    problem = tls_problem(tls_certs.cert_file, missing)
    assert problem is not None and str(missing) in problem and "cannot read" in problem
    problem = tls_problem(tls_certs.key_file, tls_certs.cert_file)  # swapped
    assert problem is not None
    assert f"certificate file {tls_certs.key_file} holds no PEM certificate" in problem
    assert f"key file {tls_certs.cert_file} holds no PEM private key" in problem
    assert tls_problem(tls_certs.cert_file, tls_certs.key_file) is None


async def test_hot_reload_of_a_bad_users_file_logs_problems_not_secrets(
    relay_factory: RelayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = await relay_factory(routes=[dead_route("one", ["one.test"])], enable_delivery=False)
    data = yaml.safe_load(relay.config_path.read_text())
    data["auth"]["users_file"] = str(_planted_users(tmp_path))
    relay.write_config(data)
    await wait_reloads(relay, "failure", 1)
    refused = [r for r in caplog.records if "Refused the new configuration" in r.getMessage()]
    assert refused, caplog.text
    assert "users[0].password_hash: must be a bcrypt hash" in refused[0].getMessage()
    assert SECRET_PLAIN not in caplog.text and "SecretSaltPrefix" not in caplog.text
    for word in INTERNALS:
        assert word not in caplog.text


def test_operator_spec_problems_use_the_same_words() -> None:
    spec = {
        "replicas": "many",
        "allowedNetworks": [7],
        "listener": {"port": 0, "colour": "blue"},
        "auth": {"required": True, "usersSecretRef": {"name": "u"}},
    }
    with pytest.raises(ValidationError) as failed:
        models.MailRelaySpec.model_validate(spec)
    message = validation_message(failed.value, spec)
    for word in INTERNALS:
        assert word not in message, message
    assert "replicas: must be a whole number" in message
    assert "listener.colour: is not a known setting" in message
    assert "allowedNetworks[0]:" in message


def test_operator_reports_host_bits_in_words() -> None:
    spec = models.MailRelaySpec.model_validate(
        {"auth": {"required": False}, "allowedNetworks": ["10.1.2.3/16"]}
    )
    with pytest.raises(RelayConfigError) as failed:
        build_relay_config(name="outbound", namespace="mail", spec=spec, routes=[])
    assert "allowed_networks[0]: 10.1.2.3/16 has host bits set; did you mean 10.1.0.0/16?" in str(
        failed.value
    )
