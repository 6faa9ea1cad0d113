# `make run`: set up .venv and run the whole pipeline. `make test`: set up .venv and run the tests.
# Both are idempotent: the install is redone only when pyproject.toml changes.
VENV := .venv
PY := $(VENV)/bin/python
# torch pinned to the wheels this project is tested with; override e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: run test bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,timm]'
	touch $@

run: install
	dvc repro
	@python -c "import json; m = json.load(open('reports/metrics.json')); \
	print(f\"Student model test accuracy: {100 * m['student_acc']:.2f} %\"); \
	print(f\"Is above threshold performance? {m['above_threshold']}\"); \
	print(f\"Distillation gain over the student alone: {100 * m['kd_gain']:+.2f} points (the teacher is \" \
	      f\"{100 * (m['teacher_acc'] - m['baseline_acc']):.2f} points ahead of the student alone): reports/report.md\")"

test: install
	pytest -q

bench: install
	python bench/throughput.py --out BENCHMARKS.md --json bench/results.json
	python bench/integrity.py --append BENCHMARKS.md --json bench/results.json
	python bench/topk.py --append BENCHMARKS.md --json bench/results.json
	python bench/cache_throughput.py --append BENCHMARKS.md --json bench/results.json
	python bench/zarr_codecs.py --append BENCHMARKS.md --json bench/results.json
	python bench/distill_ooc.py --append BENCHMARKS.md --json bench/results.json
	OMP_NUM_THREADS=1 python bench/student_speed.py --append BENCHMARKS.md --json bench/results.json

clean:
	rm -rf models cache reports
