# Two commands do all the set-up: `make demo` and `make test`. Both build .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo-out

.PHONY: demo test chromium labelstudio lint bench bench-dedupe bench-download bench-train bench-fcn bench-scale lock clean-demo venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,s3]' 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -c "import pipeline, ray, torch, torchvision, imagehash" 
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline.demo --out $(DEMO_OUT)

# The report's browser tests drive Debian's Chromium (Playwright downloads no browser of its own).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The live annotator test (tests/test_labelstudio_live.py) starts a real Label Studio, pinned, in an
# environment of its own (its Django and pins are not ours); installed when missing, like Chromium.
LS_VENV := .venv-labelstudio
LS_STAMP := $(LS_VENV)/.installed-stamp
labelstudio: $(LS_STAMP)

$(LS_STAMP): infra/labelstudio-constraints.txt
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet -c infra/labelstudio-constraints.txt label-studio 2>&1 | grep -v '^WARNING: Location' || true
	$(LS_VENV)/bin/python -c "import label_studio"
	@touch $(LS_STAMP)

test: $(STAMP) chromium $(LS_STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: bench-dedupe bench-download bench-train bench-fcn bench-scale

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,s3,bench]' 2>&1 | grep -v '^WARNING: Location' || true
	@touch $(BENCH_STAMP)

bench-dedupe: $(BENCH_STAMP)
	$(PY) bench/dedupe.py

# img2dataset pins pandas<3, which clashes with ours: it gets an environment of its own, pinned too.
PEER_VENV := bench/.venv-img2dataset
$(PEER_VENV)/.stamp: bench/img2dataset-constraints.txt
	@test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet -c bench/img2dataset-constraints.txt img2dataset 2>&1 | grep -v '^WARNING: Location' || true
	@touch $@

bench-download: $(STAMP) $(PEER_VENV)/.stamp
	$(PY) bench/download.py --peer-python $(PEER_VENV)/bin/python

bench-train: $(STAMP)
	$(PY) bench/train.py

bench-fcn: $(STAMP)
	$(PY) bench/fcn.py

bench-scale: $(STAMP)
	$(PY) bench/scale.py

# Re-resolve the pins from pyproject.toml into constraints.txt (needs the registry).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet '.[dev,s3,bench]'
	( echo '# Exact pins for every install of cropclean (make uses it as a pip constraints file).'; \
	  echo '# Regenerate with: make lock'; \
	  .lock-venv/bin/pip freeze --exclude cropclean ) > constraints.txt
	rm -rf .lock-venv

clean-demo:
	rm -rf $(DEMO_OUT)
