# Two commands on a fresh machine:  `make demo` (install + run the tiny Granite pipeline)
# and `make test` (install + run the tests). Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
ONLY   ?=
STAMP  := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines
	$(PY) -m pip install -q -c constraints.txt torch
	# both environments in one venv (CPU, no vLLM); the GPU worker is the Dockerfile's image
	$(PY) -m pip install -q -c constraints.txt -e '.[orchestrator,worker,serve-cpu,test]'
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium and its driver, from the distribution, for the MLflow UI browser test
# (tests/integration/test_mlflow_ui.py). chromium-driver pulls chromium in.
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)
/usr/bin/chromedriver:
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver

# bubblewrap, from the distribution: the sandbox of the RL code reward (stages/rl/sandbox.py)
/usr/bin/bwrap:
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends bubblewrap

# A real single-node Slurm (slurmctld, slurmd, munge), from the distribution: the tests start it
# on this machine (tests/support/slurm_cluster.py) and submit real batch jobs to it
/usr/sbin/slurmctld:
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends slurm-wlm munge

demo: $(STAMP) /usr/bin/bwrap
	$(VENV)/bin/forge run pipeline=granite-4.1-tiny $(if $(ONLY),--only '$(ONLY)')

test: $(STAMP) /usr/bin/chromedriver /usr/bin/bwrap /usr/sbin/slurmctld
	$(PY) -m pytest -q --durations=15

bench: $(STAMP)
	$(PY) benchmarks/pretrain_throughput.py
	$(PY) benchmarks/cached_rerun.py
	$(PY) benchmarks/convert_memory.py
	$(PY) benchmarks/long_context.py
	$(PY) benchmarks/sft_loss.py
	$(PY) benchmarks/curation_rules.py
	$(PY) benchmarks/judge_throughput.py
	$(PY) benchmarks/logprob_memory.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/rollout_throughput.py
	$(PY) benchmarks/rl_signal.py
	$(PY) benchmarks/tokenize_scale.py
	$(PY) benchmarks/checkpoint_manifest.py

.PHONY: install demo test bench
