#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, run the test suite's GPU-marked tests (APT under bf16 and fp16
# autocast, masks = surgery on the GPU, importance and rank growth under autocast, export, the allocator's peak),
# then the method comparison on the real MiniLM and the bundled SST-2 sample for a few hundred steps, and print
# the figures.
#
#   benchmarks/gpu_check.sh                      # python from PATH, results in runs/gpu_check
#   PYTHON=.venv/bin/python OUT=/tmp/gc EPOCHS=2 benchmarks/gpu_check.sh
#
# Needs a CUDA build of torch (prunetune's own requirements pin none); nothing is downloaded (HF_HUB_OFFLINE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/gpu_check}
EPOCHS=${EPOCHS:-3}  # 4000 rows in batches of 32: 125 steps per epoch
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'PYEOF'
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"gpu_check: no CUDA GPU visible to torch {torch.__version__} (a CPU build?)")
name = torch.cuda.get_device_name(0)
print(f"gpu_check: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no (fp16 with a gradient scaler)'}")
PYEOF

echo "== GPU-marked tests"
"$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py

echo "== method comparison: MiniLM, bundled SST-2, $EPOCHS epoch(s), precision auto (bf16 where supported)"
"$PY" benchmarks/compare_methods.py --methods full lora prune-lora lora-prune apt --epochs "$EPOCHS" \
    --heap default --out "$OUT"
echo "== figures ($OUT/results.md)"
cat "$OUT/results.md"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
reports = json.loads((Path(sys.argv[1]) / "results.json").read_text())["reports"]
print("\nmethod      precision  device  steps  train s  peak train MB  dev acc")
for name, r in reports.items():
    p = r["precision"]
    print(f"{name:<11} {p['used']:<10} {p['device']:<7} {r['train_steps']:>5}  {r['train_time_s']:>7.1f}  "
          f"{r['peak_train_mem_mb']:>13.0f}  {100 * r['metrics']['main']:.2f}")
print("peak train MB: " + next(iter(reports.values()))["peak_train_mem_how"])
PYEOF
