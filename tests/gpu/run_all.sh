#!/usr/bin/env bash
# Every GPU figure in one go, on the accelerator machine, from the repository root:
#
#   bash tests/gpu/run_all.sh            # pytest -m gpu tests/gpu, then benchmarks/mfu.py
#
# Logs and mfu.json go to $OUT when it is set (the device machine's return folder), else to
# ./gpu-results. Budget: each part has its own timeout (tests 300 s, benchmark 200 s), so the
# whole run stays under ~9 minutes even when something hangs; expected about 3-4 minutes.
#
# It downloads nothing. A machine whose Python lacks a worker package (the device image has torch,
# triton and pytest but no megatron-core) takes it from wheels carried in .whl/, installed offline
# into /tmp/site. Make them beforehand on a machine with PyPI:
#
#   bash tests/gpu/run_all.sh --fetch    # megatron-core for Python 3.12 / x86-64 into .whl/
#
# Transformer Engine is not fetched: its core wheel is ~270 MB (over the 64 MiB a device call
# carries) and its torch extension compiles against the local torch. Where TE is missing the FP8
# tests skip and mfu.py runs bf16 on Megatron's local layer spec, marked as such.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # the versions pyproject allows; >= 0.17 needs Python 3.12, as on the device machine
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 -d .whl "megatron-core>=0.16,<0.20"
fi

RESULTS=${OUT:-gpu-results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

if compgen -G '.whl/*.whl' >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PY" - <<'EOF'
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for mod in ("megatron.core", "transformer_engine"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:  # ImportError, or OSError from missing CUDA libraries
        print(mod, "NOT importable:", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
EOF

status=0
echo "== pytest -m gpu tests/gpu"
timeout 300 "$PY" -m pytest -m gpu tests/gpu -q -s -rA -p no:cacheprovider --timeout=280 \
    2>&1 | tee "$RESULTS/gpu-tests.log" || status=1
echo "== benchmarks/mfu.py ($(( $(date +%s) - start )) s so far)"
timeout 200 "$PY" benchmarks/mfu.py --json "$RESULTS/mfu.json" 2>&1 | tee "$RESULTS/mfu.log" || status=1
echo "== done in $(( $(date +%s) - start )) s; exit $status; logs in $RESULTS"
exit $status
