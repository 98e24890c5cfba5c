# Everything a fresh machine needs goes through these targets; see README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The repo root holds a folder named `operator`; never let the current directory shadow
# the standard library's module of that name (sys.path[0] for `python -m`). With it, a
# script's own folder is not on sys.path either, hence PYTHONPATH=hack for the dev tools.
export PYTHONSAFEPATH := 1
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck fmt venv control-plane node cluster-up cluster-down crds chart-sync clean bench

# Main job: a real single-node cluster; helm install the chart, upstream pods, a client pod
# sending mail through the relay Service (hack/clusterdemo.py).
demo: venv control-plane node
	PYTHONPATH=hack $(PY) hack/demo.py

# All tests: unit, relay on loopback, API tests against a real kube-apiserver + etcd, and
# tests on real pods (marker `node`) on the single-node cluster.
test: venv control-plane node lint
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
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

# mypy cannot map folders to module names, so it checks a symlinked view of the package.
typecheck: venv
	rm -rf .typecheck && mkdir -p .typecheck/mailrelay
	ln -s ../../operator .typecheck/mailrelay/operator
	ln -s ../../relay .typecheck/mailrelay/relay
	$(VENV)/bin/mypy -p mailrelay -p tests
	cd hack && ../$(VENV)/bin/mypy --config-file ../pyproject.toml *.py
	if ls bench/*.py >/dev/null 2>&1; then MYPYPATH=bench $(VENV)/bin/mypy bench; fi

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Builds (once, cached under ~/.cache/mailrelay) kubelet, kube-controller-manager,
# kube-scheduler, kube-proxy, containerd, CoreDNS, local-path-provisioner; installs the Debian
# packages the node needs; builds the images (base, project, upstreams) with podman.
node: venv control-plane
	hack/build-node.sh >/dev/null
	PYTHONPATH=hack $(PY) hack/localnode.py build

# A real single-node cluster that outlives the command (hack/localnode.py).
cluster-up: venv control-plane node
	PYTHONPATH=hack $(PY) hack/localnode.py up

cluster-down: venv
	PYTHONPATH=hack $(PY) hack/localnode.py down

# Regenerates crds/*.yaml from the pydantic models, and the chart's copies of them.
crds: venv
	$(PY) -m mailrelay.operator.crdgen crds
	$(MAKE) --no-print-directory chart-sync

# Writes the chart's generated files (RBAC rules, CRDs) from their one source.
chart-sync: venv
	$(PY) hack/sync_chart.py

# Relay vs Postfix on loopback (needs root and Debian's postfix package); see bench/README.md.
# Smoke run: make bench BENCH_ARGS=--quick
bench: venv
	$(PY) bench/relay_vs_postfix.py $(BENCH_ARGS)

clean:
	rm -rf .typecheck .mypy_cache .pytest_cache .ruff_cache
