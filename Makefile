PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test data clean bench

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements.txt
	$(VPY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

data: $(STAMP)
	test -f dataset/roadside_synth/annotations/instances_train.json || \
	  $(VPY) tools/make_synthetic_roadside.py --out dataset/roadside_synth --num-train 48 --num-val 16 --seed 0

demo: data
	$(VPY) train.py -c configs/demo_cpu.yaml --output-dir output/demo --overwrite

test: $(STAMP)
	$(VPY) -m pytest -q tests

bench: $(STAMP)
	$(VPY) -m bench.cass_loss_bench

clean:
	rm -rf output
