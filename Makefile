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
	$(VPY) tools/infer.py -c configs/demo_cpu.yaml -r output/demo/last.pth --device cpu --score 0.3 \
	  --input dataset/roadside_synth/images/val --limit 3 --out output/demo/infer
	@echo "TensorBoard (losses, AP, DSET mask pictures cass/mask_level*): $(VENV)/bin/tensorboard --logdir output"

# 2 pytest-xdist workers, one test file per worker at a time (module fixtures built once); TEST_WORKERS=0 runs
# the suite in one process
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

bench: $(STAMP)
	$(VPY) -m bench.cass_loss_bench

clean:
	rm -rf output
