# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test venv browser clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	# nnU-Net's networks for `bench peers`, without its timm<1.0.23 pin (see pyproject.toml)
	$(PY) -m pip install --quiet --no-deps -c constraints.txt dynamic_network_architectures
	touch $(STAMP)

venv: $(STAMP)

# The browser tests drive Debian's Chromium (Playwright's own browser download is not used).
# Installed when missing and running as root with apt-get, as CI does; elsewhere it says what to do
# and the browser tests report that they cannot run (with CI=true they fail instead).
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's chromium for the browser tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	else \
		echo "NOTE: $(CHROMIUM) is missing and this is not root with apt-get: the browser tests cannot run."; \
		echo "      Install it (sudo apt-get install chromium) or set CHROMIUM=/path/to/chromium."; \
		if [ "$${CI:-}" = true ]; then exit 1; fi; \
	fi

demo: $(STAMP)
	$(VENV)/bin/medtuning demo --out demo-output --force

# One test worker per core, at most 4 (each test runs on one thread); a module's tests stay in one worker so
# that its fixtures (small trained models, servers) are built once.
test: $(STAMP) browser
	$(PY) -m pytest Testing -q -n auto --maxprocesses 4 --dist loadfile

clean:
	rm -rf $(VENV) demo-output build
