# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv/ (pinned torch + test deps + the hook) when it is missing, and
# put the hook back whenever it is not in place (after a revert, a reinstalled torch,
# a change to a hook's text).
PY      := .venv/bin/python
STAMP   := .venv/.installed
HOOK    := tools/protocol_version_hook.py
TESTS   := test/distributed
# The suites that mostly cost time: make test-all adds them to make test (CI runs both).
LONG_TESTS := $(addprefix $(TESTS)/,test_protocol_version_cluster.py test_upstream_suite_subset.py \
              test_protocol_version_packaging.py test_protocol_version_agents_static.py \
              test_protocol_version_releases.py)
# Defined before the rules that use them: make expands prerequisites as it reads.
STOCK_PY    := .venv-stock/bin/python
STOCK_STAMP := .venv-stock/.installed
# Torch 2.14.1, the other release the hooks know, with the hooks: the CUDA wheel from
# the registry (there is no CPU build of it; it runs gloo on CPU), 5.6 GB with its
# dependencies. The long target runs a rolling update from the pinned base to it.
NEXT_PY     := .venv-2.14/bin/python
NEXT_STAMP  := .venv-2.14/.installed
NEXT_TORCH  := torch==2.14.1
NEXT_STOCK_STAMP := .venv-stock-2.14/.installed
# The pin of requirements.txt, held to its CPU build: without the CPU index
# (README: PIP_EXTRA_INDEX_URL) pip then stops with "no matching distribution"
# instead of downloading the CUDA build and its nvidia-* dependencies.
CPU_TORCH   := $(shell sed -n 's/^torch==\([^ ]*\).*/torch==\1+cpu/p' requirements.txt)
# pip byte-compiles what it installs (two thirds of a venv's 77 s): without it, where
# PYTHONDONTWRITEBYTECODE is set (this machine, many CI images), every interpreter a
# test starts compiles torch again, which made make test 260 s slower than the 100 s saved.
PIP_INSTALL  = -m pip install --quiet --disable-pip-version-check -r requirements.txt "$(CPU_TORCH)"

.PHONY: demo test test-long test-2.14 test-all lint bench upstream-suite wheel clean-venv hook-diff hooked hooked-2.14 docs cluster-demo

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) $(PIP_INSTALL)
	touch $(STAMP)

# The stamp only says the packages were installed once; the hook tool says whether
# torch, the hooks and the links are in place now. When anything is missing, pip
# puts back the pins (a no-op when they are there, torch itself when it was
# uninstalled) and install puts back the hooks and the links. Where install refuses
# (a hook whose text changed since it went in), torch is reinstalled first.
hooked: $(STAMP)
	@$(PY) $(HOOK) status >/dev/null 2>&1 || { $(PY) $(PIP_INSTALL) && { $(PY) $(HOOK) install || \
	  { $(PY) -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$(CPU_TORCH)" \
	    && $(PY) $(HOOK) install; }; }; }

# The same for .venv-2.14 (torch 2.14.1 and the hooks), from the registry's wheel.
hooked-2.14: $(NEXT_STAMP)
	@$(NEXT_PY) $(HOOK) status >/dev/null 2>&1 || $(NEXT_PY) $(HOOK) install || \
	  { $(NEXT_PY) -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$(NEXT_TORCH)" \
	    && $(NEXT_PY) $(HOOK) install; }

demo: hooked
	$(PY) tools/demo.py

# The contributor's loop: lint, then every test but the long suites, in two workers
# (pytest-xdist; a class's tests stay on one worker, which runs them in order). On a
# fresh clone the two venvs install side by side, pip being single-threaded, unless
# make was given its own -j; each one's output comes whole (-Otarget).
test:
	$(MAKE) --no-print-directory $(if $(filter -j%,$(MAKEFLAGS)),,-j2) -Otarget lint $(STOCK_STAMP)
	$(PY) -m pytest $(TESTS) -q -p no:cacheprovider -n 2 --dist loadscope $(addprefix --ignore=,$(LONG_TESTS))

# The long suites: the namespace cluster with real other builds, upstream's suites'
# subsets, packaging with wheel builds, the static rendezvous' torchrun scenes. Run
# serially: their scenes time themselves.
test-long: hooked $(STOCK_STAMP) hooked-2.14
	$(PY) -m pytest $(LONG_TESTS) -q -p no:cacheprovider

# make test's suite and the static rendezvous' scenes on torch 2.14.1, the other
# supported release: the hooks in .venv-2.14, stock 2.14.1 (.venv-stock-2.14) as the
# baseline. The other long suites are about the pinned base: its wheel (packaging, the
# cluster's other builds), its upstream suites, and the update from it to 2.14.1.
test-2.14: hooked-2.14 $(NEXT_STOCK_STAMP)
	PV_STOCK_PYTHON=$(CURDIR)/.venv-stock-2.14/bin/python $(NEXT_PY) -m pytest $(TESTS) -q -p no:cacheprovider \
	  -n 2 --dist loadscope $(addprefix --ignore=,$(filter-out %_agents_static.py,$(LONG_TESTS)))

# One after the other, even under make -j: the long suites time themselves.
test-all:
	$(MAKE) test
	$(MAKE) test-long
	$(MAKE) test-2.14

# ruff with upstream PyTorch's selection (pyproject.toml) everywhere, and mypy --strict
# on the package. make test runs it first, in a make of its own: where test is also a
# goal (make lint test, make -j2 lint test), lint is left to it, which lints once and
# installs .venv once (each make reads its own goals: test's own make has lint, not test).
ifeq ($(filter test,$(MAKECMDGOALS)),)
lint: hooked
	$(PY) -m ruff check torch tools benchmarks test
	$(PY) -m mypy torch/distributed/_protocol_version
else
lint: ;
endif

# The pages of docs/source with Sphinx and MyST, warnings as errors (make test runs
# the same build: test/distributed/test_protocol_version_docs.py).
docs: hooked
	$(PY) -m sphinx -W --keep-going -q -b html docs/source build/docs
	@echo "docs: build/docs/index.html"

hook-diff: hooked
	$(PY) $(HOOK) diff

clean-venv:
	rm -rf .venv .venv-stock .venv-2.14 .venv-stock-2.14

# Longer suites, each its own target (times measured on the 2-core machine: see README).
bench: hooked $(STOCK_STAMP)
	$(PY) benchmarks/distributed/bench_protocol_version.py

# A second environment with the same pinned wheel and no hook: the baseline.
$(STOCK_STAMP): requirements.txt
	test -x $(STOCK_PY) || python3 -m venv .venv-stock
	$(STOCK_PY) $(PIP_INSTALL)
	touch $(STOCK_STAMP)

# Every pin of requirements.txt but torch's, with torch 2.14.1 in its place.
# Torch 2.14.1 with the hooks (.venv-2.14) and without (.venv-stock-2.14, the baseline of make test-2.14).
$(NEXT_STAMP) $(NEXT_STOCK_STAMP): requirements.txt
	test -x $(@D)/bin/python || python3 -m venv $(@D)
	sed '/^torch==/d' requirements.txt > $(@D)/requirements.txt
	$(@D)/bin/python -m pip install --quiet --disable-pip-version-check -r $(@D)/requirements.txt "$(NEXT_TORCH)"
	touch $@

upstream-suite: hooked $(STOCK_STAMP)
	$(PY) tools/run_upstream_suite.py --full

wheel: hooked
	$(PY) tools/build_patched_wheel.py

# Three hosts made on this machine (needs root): a rolling update with real builds,
# then the guardrail's own first rollout beside a stock torch host.
cluster-demo: hooked $(STOCK_STAMP) hooked-2.14
	$(PY) tools/cluster_demo.py
