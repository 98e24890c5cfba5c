"""Upstreams: everything that sends a queued message on, behind one `Transport` protocol.

Imports flow one way, top to bottom:

- `transport`: the shared types (the `Transport` protocol, `RecipientResult`,
  `RecipientOutcome`, the `Envelope` of `relay/envelope.py`) and helpers every transport
  uses (`split_unsendable`, `describe_error`); it imports no implementation;
- `smtp` (with `smtp_pipelining`): the SMTP transport and its connection pool;
- `providers`: one transport per HTTP provider on a shared base, and `providers.registry`,
  which maps a provider name to its class;
- `factory`: `build_transport(upstream)` for any upstream from the config, the only module
  that imports both implementations. The delivery engine imports it; nothing here
  imports it back.

This package imports nothing itself (`tests/relay/test_import_layers.py` checks the flow).
"""
