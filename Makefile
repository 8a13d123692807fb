# llmray developer entry points. Every target installs what it needs first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv bins kueue-bin s3-server cluster-up cluster-down test test-unit test-cluster test-ray test-e2e test-kind lint crds demo sandbox-up sandbox-down kind-up kind-down images kind-demo clean

help:
	@echo "make demo         - sandbox up, train the tiny model, serve it, query it"
	@echo "make test         - install everything and run the whole test suite"
	@echo "make lint         - ruff + mypy"
	@echo "make cluster-up   - local Kubernetes control plane (kwok) on loopback"
	@echo "make cluster-down - stop it and remove its files"
	@echo "make sandbox-up   - control plane + local Ray head + operator"
	@echo "make sandbox-down - stop the sandbox"
	@echo "make kind-up      - a real kind cluster built offline (tests/kind/kind.sh)"
	@echo "make images       - build the operator and runtime images (and load them into kind)"
	@echo "make kind-demo    - the demo on kind: Helm-installed operator, Ray in real pods"
	@echo "make kind-down    - delete the kind cluster, stop the dockerd it started"

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -e '.[workloads,dev]'
	touch $@

venv: $(VENV)/.installed

bins:
	bash tests/cluster/build.sh

# The real Kueue manager of the cluster tier's queueing tests (not needed by the demo).
kueue-bin:
	bash tests/cluster/build.sh kueue

# The S3 server of the ray tier's object-storage test (moto, in a venv of its own: tests/s3_server.py).
s3-server: venv
	$(VPY) -m tests.s3_server

cluster-up:
	bash tests/cluster/cluster.sh up

cluster-down:
	bash tests/cluster/cluster.sh down

crds: venv
	$(VENV)/bin/llmray crds

lint: venv
	$(VENV)/bin/ruff check operator workloads tests benchmarks
	$(VENV)/bin/ruff format --check operator workloads tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/llmray crds --check

# Three pytest sessions (tests/run_tiers.sh): the Kubernetes tiers (unit, cluster, e2e: one kwok
# control plane), the Ray tier (one local Ray cluster; Ray's driver keeps one GCS connection and auth
# token per process, so its in-process driver gets a process of its own) and the kind tier (a real
# cluster, real pods), whose tools and images build in the background while the others run.
test: venv bins kueue-bin s3-server lint
	bash tests/run_tiers.sh

test-unit: venv
	$(VENV)/bin/pytest -m unit tests/unit

test-cluster: venv bins kueue-bin
	$(VENV)/bin/pytest -m cluster tests/cluster

test-ray: venv s3-server
	$(VENV)/bin/pytest -m ray tests/ray

test-e2e: venv bins
	$(VENV)/bin/pytest -m e2e tests/e2e

test-kind: venv bins
	$(VENV)/bin/pytest -m kind tests/kind

sandbox-up: venv bins
	$(VENV)/bin/llmray sandbox up

sandbox-down:
	@if [ -x $(VENV)/bin/llmray ]; then $(VENV)/bin/llmray sandbox down; \
	else LLMRAY_CLUSTER_DIR=.cache/sandbox/cluster bash tests/cluster/cluster.sh down; fi

kind-up: bins
	bash tests/kind/kind.sh up

kind-down:
	bash tests/kind/kind.sh down

images:
	bash tests/kind/kind.sh images

kind-demo: venv bins kind-up images
	$(VPY) -m llmray.demo --kind

demo: venv bins
	$(VPY) -m llmray.demo

clean: cluster-down kind-down
	rm -rf .cache
