# llmray developer entry points. Every target installs what it needs first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv bins cluster-up cluster-down test test-unit test-cluster test-ray test-e2e lint crds demo sandbox-up sandbox-down clean

help:
	@echo "make demo         - sandbox up, train the tiny model, serve it, query it"
	@echo "make test         - install everything and run the whole test suite"
	@echo "make lint         - ruff + mypy"
	@echo "make cluster-up   - local Kubernetes control plane (kwok) on loopback"
	@echo "make cluster-down - stop it and remove its files"
	@echo "make sandbox-up   - control plane + local Ray head + operator"
	@echo "make sandbox-down - stop the sandbox"

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -e '.[workloads,dev]'
	touch $@

venv: $(VENV)/.installed

bins:
	bash tests/cluster/build.sh

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

# Two pytest sessions: the Kubernetes tiers (unit, cluster, e2e: one control plane) and the Ray
# tier (one local Ray cluster). Ray's driver keeps one GCS connection and auth token per process,
# so the ray tier's in-process driver gets a process of its own.
test: venv bins lint
	$(VENV)/bin/pytest -m "not ray" tests
	$(VENV)/bin/pytest -m ray tests/ray

test-unit: venv
	$(VENV)/bin/pytest -m unit tests/unit

test-cluster: venv bins
	$(VENV)/bin/pytest -m cluster tests/cluster

test-ray: venv
	$(VENV)/bin/pytest -m ray tests/ray

test-e2e: venv bins
	$(VENV)/bin/pytest -m e2e tests/e2e

sandbox-up: venv bins
	$(VENV)/bin/llmray sandbox up

sandbox-down:
	@if [ -x $(VENV)/bin/llmray ]; then $(VENV)/bin/llmray sandbox down; else bash tests/cluster/cluster.sh down; fi

demo: venv bins
	$(VPY) -m llmray.demo

clean: cluster-down
	rm -rf .cache
