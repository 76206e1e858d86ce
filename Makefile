# Two entry points (see README): `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KD     := $(VENV)/bin/kdprobe
STAMP  := $(VENV)/.kdprobe-installed
DEMO   ?= demo-out

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(DEMO) .pytest_cache
