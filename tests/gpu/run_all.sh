#!/usr/bin/env bash
# Every GPU check in one go, on a bare GPU machine without network, from the repository root:
#
#   python tests/gpu/fetch_wheels.py     # first, on a machine with PyPI: tests/gpu/wheels/
#   bash tests/gpu/run_all.sh            # then on the GPU machine, with tests/gpu/wheels/ carried
#
# 1. installs tests/gpu/wheels/*.whl (megatron-core) offline into a scratch target directory that
#    goes on PYTHONPATH (pip --no-index --no-deps; nothing reaches the network);
# 2. pytest -m gpu tests/gpu: a bf16 phase through the stage worker on Megatron's local layer spec,
#    Megatron <-> HF conversion on the GPU; tests needing Transformer Engine or vLLM report
#    "not installed" where those are absent;
# 3. benchmarks/mfu.py in bf16 on the local layer spec (granite-8b shape, 4 layers, seq 4096);
# 4. one summary table (tests/gpu/summary.py); exit 1 when anything that ran failed.
#
# Logs, tests.jsonl and mfu.json go to $OUT when it is set (the device machine's return folder),
# else to a fresh temporary directory. Each part has its own timeout (install 60 s, tests 240 s,
# benchmark 150 s): 7.5 minutes at most even when something hangs.
#
#   bash tests/gpu/run_all.sh --fetch    # the same as python tests/gpu/fetch_wheels.py
#
# Environment: PYTHON (default python3), FORGE_GPU_WHEELS (default tests/gpu/wheels),
# FORGE_GPU_SITE (the scratch install target, default /tmp/forge-gpu-site).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--fetch" ]]; then
    exec "$PY" tests/gpu/fetch_wheels.py "${@:2}"
fi

RESULTS=${OUT:-$(mktemp -d -t forge-gpu-XXXXXX)}
mkdir -p "$RESULTS"
SITE=${FORGE_GPU_SITE:-/tmp/forge-gpu-site}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
rows=()

WHEELS=${FORGE_GPU_WHEELS:-tests/gpu/wheels}
echo "== install $WHEELS -> $SITE"
wheels=("$WHEELS"/*.whl)
if [[ -e "${wheels[0]}" ]]; then
    rm -rf "$SITE"
    t0=$(date +%s.%N)
    rc=0
    if "$PY" -m pip --version >/dev/null 2>&1; then
        timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --disable-pip-version-check --target "$SITE" "${wheels[@]}" || rc=$?
    else  # no pip: a wheel is a zip of what goes into site-packages
        for w in "${wheels[@]}"; do
            timeout 60 "$PY" -m zipfile -e "$w" "$SITE" || { rc=$?; break; }
        done
    fi
    secs=$("$PY" -c "import time; print(f'{time.time() - $t0:.1f}')")
    mib=$("$PY" -c 'import os, sys; print(f"{sum(map(os.path.getsize, sys.argv[1:])) / 2**20:.1f}")' \
          "${wheels[@]}")
    names=$(basename -a "${wheels[@]}" | cut -d- -f1-2 | paste -sd, -)
    if [[ $rc == 0 ]]; then
        rows+=("install ${names}|ran|${mib} MiB of wheels in ${secs} s, offline")
    else
        rows+=("install ${names}|failed|exit $rc after ${secs} s (output above)")
    fi
else
    echo "no $WHEELS/*.whl: using what this Python has"
fi

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
machine=$("$PY" - <<'EOF'
import sys
try:
    import torch
    import megatron.core
except Exception as e:  # ImportError, or OSError from missing CUDA libraries
    print(f"failed|{type(e).__name__}: {e}; run python tests/gpu/fetch_wheels.py where PyPI is "
          "reachable and carry tests/gpu/wheels/")
    sys.exit()
if not torch.cuda.is_available():
    print("failed|no CUDA device visible to torch (CUDA_VISIBLE_DEVICES?)")
    sys.exit()
print(f"ran|{torch.cuda.get_device_name()}; python {sys.version.split()[0]}, torch "
      f"{torch.__version__} (CUDA {torch.version.cuda}), megatron-core {megatron.core.__version__}")
EOF
)
echo "$machine"
rows+=("machine|${machine:-failed|the check itself failed (output above)}")

summary=(--report "$RESULTS/tests.jsonl" --mfu-json "$RESULTS/mfu.json")
if [[ "$machine" == ran* ]]; then
    echo "== pytest -m gpu tests/gpu ($(( $(date +%s) - start )) s so far)"
    rm -f "$RESULTS/tests.jsonl"
    FORGE_GPU_REPORT="$RESULTS/tests.jsonl" timeout 240 "$PY" -m pytest -m gpu tests/gpu -q -s -rA \
        -p no:cacheprovider --timeout=200 2>&1 | tee "$RESULTS/gpu-tests.log"
    summary+=(--pytest-rc "${PIPESTATUS[0]}")
    echo "== benchmarks/mfu.py, bf16 on the local layer spec ($(( $(date +%s) - start )) s so far)"
    rm -f "$RESULTS/mfu.json"
    timeout 150 "$PY" benchmarks/mfu.py --recipes bf16 --spec local --json "$RESULTS/mfu.json" \
        2>&1 | tee "$RESULTS/mfu.log"
    summary+=(--mfu-rc "${PIPESTATUS[0]}")
else
    summary=()  # nothing can run: the machine row says why
fi

echo "== summary ($(( $(date +%s) - start )) s in all; logs in $RESULTS)"
args=()
for r in "${rows[@]}"; do args+=(--row "$r"); done
"$PY" tests/gpu/summary.py "${args[@]}" ${summary[@]+"${summary[@]}"} | tee "$RESULTS/summary.txt"
exit "${PIPESTATUS[0]}"
