PYTHON ?= python3
NIGHTLY ?= cpu

.PHONY: setup test run run-tiny sweep throughput validate calibrate tree bench nightly gpu-check

setup:  ## install the package with its test dependencies (CPU torch wheel pinned for CI)
	$(PYTHON) -m pip install "torch==2.13.0" -e ".[dev]"

test:  ## the whole CPU test suite
	$(PYTHON) -m pytest

run:  ## the main job: full-size model, dummy weights, bundled sample page, base mode
	$(PYTHON) -m llm_perf_opt.run mode=base

run-tiny:  ## the same job on the reduced model (seconds on a CPU)
	$(PYTHON) -m llm_perf_opt.run model=deepseek_ocr_tiny mode=gundam

sweep:  ## every resolution mode, one job directory each under outputs/multirun/
	$(PYTHON) -m llm_perf_opt.run -m mode=tiny,small,base,large,gundam

throughput:  ## batch 1 to 32 on the reduced model: tokens/s against TPOT, decode against the ridge (throughput.png)
	$(PYTHON) -m llm_perf_opt.run -m +experiment=throughput model=deepseek_ocr_tiny

validate:  ## analytic FLOPs and bytes (reference and fast) against counts on the meta-device model, every mode
	$(PYTHON) -m llm_perf_opt.analytic.validate
	$(PYTHON) -m llm_perf_opt.analytic.validate --bytes
	$(PYTHON) -m llm_perf_opt.analytic.validate --bytes --impl fast

calibrate:  ## measure this machine's ceilings again (matmul FLOP/s per dtype, copy GB/s)
	$(PYTHON) -m llm_perf_opt.calibrate --refresh

tree:  ## the stage-tagged module tree of the full model
	$(PYTHON) -m llm_perf_opt.tree --depth 3

bench:  ## benchmark scripts that print their figures
	$(PYTHON) benchmarks/dtype_probe.py
	$(PYTHON) benchmarks/range_overhead.py
	$(PYTHON) benchmarks/analytic_speed.py
	$(PYTHON) benchmarks/base_run.py

nightly:  ## the nightly sweep and its comparison with this machine's baseline (NIGHTLY=cpu|gpu)
	PYTHON=$(PYTHON) runners/nightly.sh $(NIGHTLY)

gpu-check:  ## the GPU half in one command: one markdown file under outputs/gpu-check/ (no GPU: says so, exits 0)
	$(PYTHON) runners/gpu_check.py
