# Tessera — `make demo` brings the platform up and runs the demo; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PACKAGES := libs/api libs/common libs/testing libs/sdk \
            services/control-store services/object-store services/task-scheduler \
            services/compiler services/gpu-scheduler services/serving services/gateway \
            services/dashboard
PYPROJECTS := $(addsuffix /pyproject.toml,$(PACKAGES))

.PHONY: install demo test test-long test-all chaos soak lint typecheck protos check-protos compose-config k8s-validate bench bench-objects bench-tasks bench-serving bench-gpu bench-compiler dashboard-test up down status clean

install: $(VENV)/.installed

$(VENV)/.installed: $(PYPROJECTS) requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	$(PIP) install -q --disable-pip-version-check --no-build-isolation $(addprefix -e ,$(PACKAGES))
	touch $@

demo: install
	$(PY) examples/demo.py

test: install check-protos
	$(PY) -m pytest -q

# the longest e2e tests, kept out of `make test` so it stays near 15 minutes on 2 cores; CI runs them too
test-long: install
	$(PY) -m pytest -q -m long

test-all: install
	$(PY) -m pytest -q -m ''

# the dashboard in a real browser (Debian's chromium, driven by Playwright): a stack, a workload, every page.
dashboard-test: install
	$(PY) -m pytest -q -s -m browser e2e-tests/test_dashboard.py

# kill -9 each process of a loaded two-node cluster in turn (TESSERA_CHAOS_REPORT: where the JSON report goes).
chaos: install
	$(PY) -m pytest -q -s -m chaos e2e-tests/test_chaos.py

# a bounded run at benchmark throughput, sampling every service's RSS (TESSERA_SOAK_S seconds, default 180).
soak: install
	$(PY) -m pytest -q -s -m soak e2e-tests/test_soak.py

lint: install
	$(VENV)/bin/ruff check libs services e2e-tests examples benchmarks scripts

typecheck: install
	$(VENV)/bin/mypy libs/common/src libs/sdk/src services/control-store/src services/object-store/src services/task-scheduler/src services/serving/src services/gpu-scheduler/src services/compiler/src services/gateway/src services/dashboard/src

protos: install
	$(PY) scripts/gen_protos.py

check-protos: install
	$(PY) scripts/gen_protos.py --check

compose-config:
	docker-compose config -q

# Render deploy/k8s (base, dev, gpu) and validate every object against the Kubernetes schemas,
# offline once its tools are in .venv-k8s (K8S_VERSIONS: which releases; see the script).
k8s-validate:
	scripts/k8s_validate.sh

bench: install
	$(PY) benchmarks/control_store_bench.py

# Ray 2.60 lives in its own venv, never in .venv: the object-store benchmark runs it beside Tessera.
.venv-ray/bin/python:
	$(PYTHON) -m venv .venv-ray
	.venv-ray/bin/pip install -q "ray==2.60.0" numpy

bench-objects: install .venv-ray/bin/python
	$(PY) benchmarks/object_store_bench.py

bench-tasks: install .venv-ray/bin/python
	$(PY) benchmarks/tasks_bench.py

# Serving: white box vs black box in-process, gRPC vs Ray Serve over HTTP (Ray Serve in .venv-ray).
.venv-ray/.serve: .venv-ray/bin/python
	.venv-ray/bin/pip install -q "ray[serve]==2.60.0" scikit-learn
	touch $@

bench-serving: install .venv-ray/.serve
	$(PY) benchmarks/serving_bench.py

up: install
	$(VENV)/bin/tessera up

down: install
	$(VENV)/bin/tessera down

status: install
	$(VENV)/bin/tessera status

clean:
	rm -rf $(VENV) build .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

bench-gpu: install
	$(PY) benchmarks/gpu_scheduler_bench.py

# The compiler beside torch eager, torch.compile (inductor, with and without freezing) and numpy/OpenBLAS.
bench-compiler: install
	$(PY) benchmarks/compiler_bench.py

# The compose stack under podman (root; ENGINE=docker for Docker): deploy/, scripts/compose_*.
# SCALE="node=2 serving=2" starts two nodes and two serving replicas. compose-test: build, up, pytest -m compose, down.
.PHONY: wheelhouse compose-build compose-up compose-down compose-test
wheelhouse: install
	scripts/compose_wheelhouse.sh

compose-build: install
	if [ "$${ENGINE:-podman}" = podman ]; then deploy/podman/setup.sh >/dev/null; fi
	scripts/compose_build.sh

compose-up: compose-build
	scripts/compose_up.sh $(foreach s,$(SCALE),--scale $(s))

compose-down:
	scripts/compose_down.sh

compose-test: install
	scripts/compose_test.sh
