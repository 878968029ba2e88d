# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv/ (pinned torch + test deps + the hook) when it is missing.
PY      := .venv/bin/python
STAMP   := .venv/.installed
TESTS   := test/distributed

.PHONY: demo test bench clean-venv hook-diff

$(STAMP): requirements.txt tools/protocol_version_hook.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) tools/protocol_version_hook.py install
	touch $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/distributed/../../tools/demo.py

test: $(STAMP)
	$(PY) -m pytest $(TESTS) -q -p no:cacheprovider

hook-diff: $(STAMP)
	$(PY) tools/protocol_version_hook.py diff

clean-venv:
	rm -rf .venv
