#!/usr/bin/env bash
# Run the test suite (CPU only). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k penalty`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
python -m pytest -q -rs --timeout=1500 "$@"
