#!/usr/bin/env bash
# The GPU check, in one call: every gpu-marked test, then the cuda_ipc benchmark (publish -> committed
# between two processes on one GPU, 1 GiB and 8 GiB of bf16, against a device copy_ of the same bytes).
# Sized to finish in well under 6 minutes on one H100; each step has its own deadline.
#
#   scripts/gpu_check.sh                 # uses .venv/bin/python when present, else $PYTHON or python3
#
# Exits 2 at once, with the reason, when no CUDA device is usable.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY="${PYTHON:-python3}"; fi
export HF_HUB_OFFLINE=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no usable CUDA device here (torch.cuda.is_available() is False, or torch is missing for $PY);" \
         "this check needs one" >&2
    exit 2
fi
"$PY" - <<'PYEOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {torch.cuda.device_count()} x {p.name} ({p.total_memory / 2**30:.0f} GiB), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

status=0
echo "== pytest -m gpu"
# A test module that cannot import here (an optional extra missing) must not hide the gpu tests.
timeout 200 "$PY" -m pytest -q -rfEs -m gpu -p no:cacheprovider --continue-on-collection-errors tests/ || status=$?
echo "== bench/bench_cuda_ipc.py"
timeout 150 "$PY" bench/bench_cuda_ipc.py --sizes-gb 1,8 --reps 3 --require-gpu || status=$?
if [ "$status" -ne 0 ]; then echo "gpu_check: FAILED (exit $status)" >&2; else echo "gpu_check: ok"; fi
exit "$status"
