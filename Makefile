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

# pytest-xdist: a worker per CPU core (2 here), each taking a whole test file at a time, the slowest files first
# (tests/conftest.py), one torch thread per worker and per command it starts.
test: install
	pytest -q -n auto --dist loadfile --no-loadscope-reorder

# `make bench`: every CPU benchmark in bench/, each writing its section of BENCHMARKS.md (throughput.py writes the file
# afresh, the others append) and merging its keys into bench/results.json, through bench/output.py; hours on a 2-core
# CPU. Each also runs alone, from the repository root: `python bench/<name>.py --help` (its docstring: what it
# measures, how to run it). search.py times `kd search` on the default pipeline's store, hence `dvc repro cache`.
# Not run here: bench/results/gpu.sh and gpu_cache_limits.sh (BENCHMARKS-GPU.md; on a CUDA machine,
# `bash bench/results/gpu.sh`), profile_cache.py and replay_check.py (checks on a GPU, printed only; run by those two
# scripts), and topk.py --store on a real teacher's store (`bash studies/scripts/topk_many_classes.sh`, which needs
# MNIST in ../shared/data). The accuracy tables of RESULTS.md are studies: studies/README.md.
bench: install
	python bench/throughput.py --out BENCHMARKS.md --json bench/results.json
	python bench/integrity.py --append BENCHMARKS.md --json bench/results.json
	python bench/topk.py --append BENCHMARKS.md --json bench/results.json
	python bench/cache_throughput.py --append BENCHMARKS.md --json bench/results.json
	python bench/zarr_codecs.py --append BENCHMARKS.md --json bench/results.json
	python bench/distill_ooc.py --append BENCHMARKS.md --json bench/results.json
	OMP_NUM_THREADS=1 python bench/distill_ooc.py --setups tiny --s3 --repeats 2 --no-scaling --append BENCHMARKS.md \
	    --json bench/results.json
	OMP_NUM_THREADS=1 python bench/student_speed.py --append BENCHMARKS.md --json bench/results.json
	OMP_NUM_THREADS=1 python bench/draws.py --append BENCHMARKS.md --json bench/results.json
	python bench/ensemble_reads.py --append BENCHMARKS.md --json bench/results.json
	python bench/imagefolder_cache.py --append BENCHMARKS.md --json bench/results.json
	python bench/teacher_compile.py --append BENCHMARKS.md --json bench/results.json
	python bench/cache_batch_size.py --append BENCHMARKS.md --json bench/results.json
	python bench/resume_cost.py --append BENCHMARKS.md --json bench/results.json
	dvc repro cache
	python bench/search.py --append BENCHMARKS.md --json bench/results.json
	OMP_NUM_THREADS=1 python bench/fault_soak.py --fsync-cost --append BENCHMARKS.md --json bench/results.json
	OMP_NUM_THREADS=1 python bench/fault_soak.py --stage cache,distill --append BENCHMARKS.md --json bench/results.json

clean:
	rm -rf models cache reports
