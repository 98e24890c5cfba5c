"""The config model: defaults, validation messages, YAML loading and --check-config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailrelay.relay.config import (
    ConfigError,
    RelayConfig,
    SmtpUpstream,
    load_config,
    parse_config,
)
from mailrelay.relay.main import main

MINIMAL: dict[str, Any] = {
    "hostname": "relay.test",
    "allowed_networks": ["10.0.0.0/8"],
    "auth": {"required": False},
    "spool": {"directory": "/var/spool/mailrelay"},
    "routes": [{"name": "out", "upstream": {"type": "smtp", "name": "mx", "host": "mx.test"}}],
}


def merged(**changes: Any) -> str:
    data = {**MINIMAL, **changes}
    return yaml.safe_dump(data)


def test_defaults_match_the_contract() -> None:
    config = parse_config(merged())
    assert config.listener.submission_port == 587
    assert config.listener.implicit_tls_port is None
    assert config.listener.workers == 1
    assert config.limits.max_message_size == 26_214_400
    assert config.limits.max_recipients == 100
    assert config.limits.max_received_headers == 50
    assert config.spool.min_free_bytes == 100 * 1024 * 1024
    assert config.retry.max_age_seconds == 432_000
    assert config.delivery.concurrency == 32
    assert config.metrics.port == 9090
    assert config.log_format == "text"
    upstream = config.routes[0].upstream
    assert isinstance(upstream, SmtpUpstream)
    assert (upstream.port, upstream.tls, upstream.pool_size) == (587, "starttls", 4)


def test_allowed_networks_are_empty_by_default() -> None:
    assert RelayConfig.model_fields["allowed_networks"].get_default(call_default_factory=True) == []


def test_every_field_is_described() -> None:
    """The operator renders this model and the docs follow it: no field without a description."""
    from pydantic import BaseModel  # noqa: PLC0415

    from mailrelay.relay import config as module  # noqa: PLC0415

    missing = [
        f"{name}.{field}"
        for name in module.__all__
        if isinstance(cls := getattr(module, name), type) and issubclass(cls, BaseModel)
        for field, info in cls.model_fields.items()
        if not info.description
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"routes": [MINIMAL["routes"][0], MINIMAL["routes"][0]]},
            "routes[1].name: route name 'out' is already used by routes[0]",
        ),
        (
            {
                "routes": [
                    MINIMAL["routes"][0],
                    {"name": "b", "upstream": {"type": "smtp", "name": "mx", "host": "other"}},
                ]
            },
            "upstream name 'mx' is used for two different upstreams",
        ),
        (
            {"routes": [{**MINIMAL["routes"][0], "match": {"recipient_domains": ["a.*.com"]}}]},
            "'a.*.com' is not a domain pattern",
        ),
        (
            {"routes": [{**MINIMAL["routes"][0], "match": {"sender_domains": ["**.x"]}}]},
            "is not a domain pattern",
        ),
        ({"auth": {"users_file": "/etc/users.yaml"}}, "AUTH is only offered after TLS"),
        ({"auth": {"required": True}}, "auth.required is true but auth.users_file is not set"),
        ({"auth": {"required": False}, "allowed_networks": []}, "no client could ever send"),
        ({"listener": {"implicit_tls_port": 465}}, "implicit_tls_port needs listener.tls"),
        (
            {"allowed_networks": ["10.0.0.1/8"]},
            "allowed_networks[0]: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
        ),
        ({"colour": "blue"}, "colour: is not a known setting"),
        ({"hostname": "relay.test\r\nX-Injected: 1"}, "hostname: must match pattern"),
        (
            {"retry": {"initial_backoff_seconds": 10, "max_backoff_seconds": 5}},
            "max_backoff_seconds",
        ),
        (
            {"routes": [{"name": "x", "upstream": {"type": "carrier-pigeon", "name": "p"}}]},
            "routes[0].upstream.type: must be one of 'smtp', 'api'",
        ),
        (
            {
                "routes": [
                    {
                        "name": "x",
                        "upstream": {
                            "type": "smtp",
                            "name": "m",
                            "host": "h",
                            "username_file": "/u",
                        },
                    }
                ]
            },
            "set both username_file and password_file",
        ),
        (
            {
                "routes": [
                    {
                        "name": "x",
                        "upstream": {"type": "smtp", "name": "m", "host": "h", "tls": "none"},
                    }
                ]
            },
            "upstream 'm': tls: none sends mail and credentials in cleartext; "
            "set insecure_allow_plaintext: true to allow it",
        ),
    ],
)
def test_invalid_configs_have_readable_messages(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as failed:
        parse_config(merged(**changes), source="relay.yaml")
    text = str(failed.value)
    assert text.startswith("relay.yaml: invalid relay configuration")
    assert message in text


def test_wildcards_and_case_are_normalised() -> None:
    config = parse_config(
        merged(routes=[{**MINIMAL["routes"][0], "match": {"recipient_domains": ["*.Example.COM"]}}])
    )
    assert config.routes[0].match.recipient_domains == ["*.example.com"]


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        merged(
            spool={"directory": "spool"},
            routes=[
                {
                    "name": "out",
                    "upstream": {
                        "type": "smtp",
                        "name": "mx",
                        "host": "mx.test",
                        "username_file": "creds/user",
                        "password_file": "/abs/pass",
                    },
                }
            ],
        )
    )
    config = load_config(path)
    assert config.spool.directory == tmp_path / "spool"
    upstream = config.routes[0].upstream
    assert isinstance(upstream, SmtpUpstream)
    assert upstream.username_file == tmp_path / "creds/user"
    assert upstream.password_file == Path("/abs/pass")
    assert tmp_path / "creds/user" in config.referenced_files()


def test_not_yaml_and_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_config("a: [1,", source="x")
    with pytest.raises(ConfigError, match="mapping of settings"):
        parse_config("- 1\n", source="x")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "nope.yaml")


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailrelay.relay", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_check_config_cli(tmp_path: Path, users_file: Path, tls_certs: Any) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        merged(
            auth={"required": True, "users_file": str(users_file)},
            listener={
                "tls": {"cert_file": str(tls_certs.cert_file), "key_file": str(tls_certs.key_file)}
            },
        )
    )
    result = run_check(good)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid (1 route(s), 2 user(s))" in result.stdout


def test_check_config_reports_every_problem(
    tmp_path: Path, tls_certs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same command in-process (`main`), for the failure cases."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(merged(limits={"max_recipients": 0}))
    assert main(["--config", str(bad), "--check-config"]) == 2
    assert "limits.max_recipients: must be greater than or equal to 1" in (capsys.readouterr().err)
    broken_users = tmp_path / "users.yaml"
    broken_users.write_text("users:\n  - username: x\n    password_hash: plaintext\n")
    worse = tmp_path / "worse.yaml"
    tls = {"cert_file": str(tls_certs.cert_file), "key_file": str(tls_certs.key_file)}
    worse.write_text(
        merged(auth={"required": True, "users_file": str(broken_users)}, listener={"tls": tls})
    )
    assert main(["--config", str(worse), "--check-config"]) == 2
    assert "users[0].password_hash: must be a bcrypt hash" in capsys.readouterr().err
    wrong_key = tmp_path / "wrong-key.yaml"
    wrong_key.write_text(
        merged(
            listener={"tls": {"cert_file": str(tls_certs.cert_file), "key_file": str(bad)}},
            auth={"required": False},
        )
    )
    assert main(["--config", str(wrong_key), "--check-config"]) == 2
    assert f"the TLS key file {bad} holds no PEM private key" in capsys.readouterr().err


DOCS = Path(__file__).resolve().parents[2] / "docs" / "relay-config.md"


def test_docs_example_is_a_valid_config() -> None:
    text = DOCS.read_text()
    example = text.split("## A full example", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    config = parse_config(example, source="docs example")
    assert [r.name for r in config.routes] == ["transactional", "partners"]


def test_docs_cover_every_field() -> None:
    from pydantic import BaseModel  # noqa: PLC0415

    from mailrelay.relay import config as module  # noqa: PLC0415

    text = DOCS.read_text()
    missing = [
        f"{name}.{field}"
        for name in module.__all__
        if isinstance(cls := getattr(module, name), type) and issubclass(cls, BaseModel)
        for field in cls.model_fields
        if f"| `{field}` |" not in text
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("changes", "restart"),
    [
        (
            {
                "routes": [
                    {"name": "x", "upstream": {"type": "smtp", "name": "m", "host": "m.test"}}
                ]
            },
            False,
        ),
        ({"log_format": "json"}, False),
        ({"listener": {"tls": {"cert_file": "/tls/tls.crt", "key_file": "/tls/tls.key"}}}, False),
        ({"listener": {"submission_port": 2587}}, True),
        ({"listener": {"workers": 2}}, True),
        ({"metrics": {"port": 9191}}, True),
        ({"spool": {"directory": "/elsewhere"}}, True),
    ],
    ids=["routes", "log-format", "tls-files", "port", "workers", "metrics-port", "spool-dir"],
)
def test_restart_settings_name_what_a_reload_cannot_apply(
    changes: dict[str, Any], restart: bool
) -> None:
    """The one rule for the relay's reload warning and the operator's pod template hash."""
    base = parse_config(merged()).restart_settings()
    changed = parse_config(merged(**changes)).restart_settings()
    assert (changed != base) is restart


def test_plaintext_upstream_needs_the_same_opt_in_as_the_mailroute() -> None:
    upstream = {"type": "smtp", "name": "m", "host": "h", "tls": "none"}
    config = parse_config(
        merged(routes=[{"name": "x", "upstream": {**upstream, "insecure_allow_plaintext": True}}]),
        source="relay.yaml",
    )
    assert config.routes[0].upstream.model_dump(include={"tls", "insecure_allow_plaintext"}) == {
        "tls": "none",
        "insecure_allow_plaintext": True,
    }
