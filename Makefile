# Two entry points (see README): `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
KD     := $(VENV)/bin/kdprobe
STAMP  := $(VENV)/.kdprobe-installed
DEMO   ?= demo-out

.PHONY: demo test test-portable install clean bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(DEMO)

# The tests run in 2 processes (pytest-xdist; one torch thread each, files kept whole per process), which
# keeps both cores of a 2-core machine busy; JOBS=1 runs them in this one process (easier to debug).
JOBS ?= 2
XDIST = $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadfile)
# scripts/test-services.sh: as root with apt-get it installs Slurm and Chromium when missing and runs the
# suite beside a private Slurm cluster (KDPROBE_TEST_SERVICES=0: neither; those tests then skip).
test: $(STAMP)
	bash scripts/test-services.sh $(PY) -m pytest $(XDIST)

# The numeric tests (pytest -m numeric) once more on another CPU kernel set than this machine's own:
# ATen's capability and MKL's and oneDNN's instruction sets one step down (AVX-512 -> AVX2, else
# -> the scalar/SSE default), THREADS intra-op threads (1; THREADS=2 splits reductions too, slower on
# 2 cores). A tolerance that only holds for one CPU's rounding fails here instead of elsewhere.
THREADS ?= 1
test-portable: $(STAMP)
	@cap=$$($(PY) -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'); \
	if [ "$$cap" = AVX512 ]; then set -- ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2; \
	else set -- ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41; fi; \
	echo "test-portable: native ATen capability $$cap; numeric tests under $$* KDPROBE_TEST_THREADS=$(THREADS)"; \
	env "$$@" KDPROBE_TEST_THREADS=$(THREADS) $(PY) -m pytest $(XDIST) -m numeric -p no:cacheprovider; \
	rc=$$?; echo "test-portable: ran under $$*, $(THREADS) thread(s)"; exit $$rc

clean:
	rm -rf $(DEMO) .pytest_cache
