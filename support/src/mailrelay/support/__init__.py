"""Helpers shared by the tests, `make demo`, the benchmarks and the dev tools.

Installed editable from the checkout (`support/pyproject.toml`), never shipped in the image:
a local control plane and node (`localkube`, `localnode`, `nodeimages`, `incluster`), the
operator as a process (`operator_harness`), real SMTP peers (`smtp_peers`), local provider
API servers (`provider_servers`), the upstream pods' program (`peers`), free ports
(`ports`) and the SMTP session fuzzer (`fuzz`).
"""
