# Everything a fresh machine needs goes through these targets; see README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck fmt venv control-plane node cluster-up cluster-down crds chart-sync clean bench

# Main job: a real single-node cluster; helm install the chart, upstream pods, a client pod
# sending mail through the relay Service (support/src/mailrelay/support/clusterdemo.py).
demo: venv control-plane node
	$(PY) -m mailrelay.support.demo

# All tests: unit, relay on loopback, API tests against a real kube-apiserver + etcd, and
# tests on real pods (marker `node`) on the single-node cluster.
test: venv control-plane node lint
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP)
# The three packages, editable, and the dev tools (pyproject.toml's dependency groups).
$(STAMP): pyproject.toml relay/pyproject.toml operator/pyproject.toml support/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./relay -e ./operator -e ./support --group dev
	touch $(STAMP)

# Builds (once, cached under ~/.cache/mailrelay) kube-apiserver, kubectl, etcd and helm,
# and promtool for the chart's alert tests.
control-plane:
	hack/build-control-plane.sh >/dev/null
	hack/build-control-plane.sh promtool >/dev/null

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) --no-print-directory typecheck

# mypy reads the src roots from pyproject.toml's mypy_path and checks the files in place.
typecheck: venv
	$(VENV)/bin/mypy -p mailrelay.relay -p mailrelay.operator -p mailrelay.support -p tests
	MYPYPATH=bench $(VENV)/bin/mypy bench

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Builds (once, cached under ~/.cache/mailrelay) kubelet, kube-controller-manager,
# kube-scheduler, kube-proxy, containerd, CoreDNS, local-path-provisioner; installs the Debian
# packages the node needs; builds the images (base, project, upstreams) with podman.
node: venv control-plane
	hack/build-node.sh >/dev/null
	$(PY) -m mailrelay.support.localnode build

# A real single-node cluster that outlives the command (hack/localnode.py).
cluster-up: venv control-plane node
	$(PY) -m mailrelay.support.localnode up

cluster-down: venv
	$(PY) -m mailrelay.support.localnode down

# Regenerates crds/*.yaml from the pydantic models, and the chart's copies of them.
crds: venv
	$(PY) -m mailrelay.operator.crdgen crds
	$(MAKE) --no-print-directory chart-sync

# Writes the chart's generated files (RBAC rules, CRDs) from their one source.
chart-sync: venv
	$(PY) -m mailrelay.support.sync_chart

# Relay vs Postfix on loopback (needs root and Debian's postfix package); see bench/README.md.
# Smoke run: make bench BENCH_ARGS=--quick
bench: venv
	$(PY) bench/relay_vs_postfix.py $(BENCH_ARGS)

clean:
	rm -rf .mypy_cache .pytest_cache .ruff_cache
