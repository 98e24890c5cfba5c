"""Fixtures for the security suite: the relay tests' loopback peers, reused as they are."""

from tests.relay.conftest import (  # noqa: F401 - pytest finds fixtures by module name
    recording_upstream,
    relay_factory,
    tls_certs,
    users_file,
)
