# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv/ (pinned torch + test deps + the hook) when it is missing.
PY      := .venv/bin/python
STAMP   := .venv/.installed
TESTS   := test/distributed
# Defined before the rules that use them: make expands prerequisites as it reads.
STOCK_PY    := .venv-stock/bin/python
STOCK_STAMP := .venv-stock/.installed

.PHONY: demo test bench upstream-suite wheel clean-venv hook-diff

$(STAMP): requirements.txt tools/protocol_version_hook.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) tools/protocol_version_hook.py install
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP) $(STOCK_STAMP)
	$(PY) -m pytest $(TESTS) -q -p no:cacheprovider

hook-diff: $(STAMP)
	$(PY) tools/protocol_version_hook.py diff

clean-venv:
	rm -rf .venv

# Longer suites, each its own target (times measured on the 2-core machine: see README).
bench: $(STAMP)
	$(PY) benchmarks/distributed/bench_protocol_version.py

# A second environment with the same pinned wheel and no hook: the baseline.
$(STOCK_STAMP): requirements.txt
	test -x $(STOCK_PY) || python3 -m venv .venv-stock
	$(STOCK_PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STOCK_STAMP)

upstream-suite: $(STAMP) $(STOCK_STAMP)
	$(PY) tools/run_upstream_suite.py --full

wheel: $(STAMP)
	$(PY) tools/build_patched_wheel.py
