# `make bench` (included from the top-level Makefile: `include bench/Makefile.mk`).
# Every figure is a ratio against a baseline measured in the same run; see bench/run.py.
# small: < 10 min on 2 CPU cores; medium: bigger model and corpus.
BENCH_SIZE ?= small
BENCH_OUT ?= bench/results

.PHONY: bench bench-gpu

bench: setup  ## CPU benchmark: bench/results/latest.{json,md} (BENCH_SIZE=small|medium)
	$(PY) -m bench.run --size $(BENCH_SIZE) --out $(BENCH_OUT)

# On a GPU machine: tokens/s and MFU of a ~1B Llama, bf16, pipeline vs plain PyTorch (~3 min on an
# H100). DeepSpeed must pick CUDA there, so the CPU default exported above is overridden.
bench-gpu: setup  ## GPU benchmark: bench/results/gpu.{json,md}
	DS_ACCELERATOR=cuda $(PY) bench/gpu.py --out $(BENCH_OUT)
