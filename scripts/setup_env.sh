#!/usr/bin/env bash
# Create (if missing) and fill the project's virtual environment.
#   VENV=.venv          where it lives
#   EXTRAS=dev          pip extras to install (a GPU cluster wants "gpu,dev")
#   TORCH_INDEX_URL     optional index for the CPU torch wheel
#   CONSTRAINTS         pip constraints file; on a machine without an NVIDIA GPU it defaults to
#                       requirements/cpu-constraints.txt (the tested set: a resolve in seconds, where
#                       verl's loose requirements otherwise make pip backtrack for ~40 minutes)
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that no dependency
# can pull the multi-GB CUDA build.
set -euo pipefail

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.l2t-installed"
want="$(cat pyproject.toml requirements/cpu-constraints.txt | sha1sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import l2t_verl, verl" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

if ! command -v nvidia-smi >/dev/null 2>&1 && ! python -c "import torch" 2>/dev/null; then
  echo "[setup] no NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
  # TORCH_INDEX_URL: PyTorch's CPU wheel index, where PyPI's default build for your platform is CUDA.
  pip install --quiet "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
if [ -z "${CONSTRAINTS+x}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  CONSTRAINTS=requirements/cpu-constraints.txt
fi
echo "[setup] installing l2t-verl[$EXTRAS] (editable)${CONSTRAINTS:+ with constraints $CONSTRAINTS}"
pip install --quiet -e ".[$EXTRAS]" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
echo "$want" > "$stamp"
python -c "import torch, verl, l2t_verl; print('[setup] torch', torch.__version__, '| verl', verl.__version__)"
