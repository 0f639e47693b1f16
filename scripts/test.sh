#!/usr/bin/env bash
# Run the test suite (CPU only). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k penalty`.
#   bash scripts/test.sh          everything (what CI runs, ~15 minutes on 2 cores)
#   bash scripts/test.sh --fast   unit tests only: no verl trainer runs, no multi-process or slow tests
#                                 (markers `e2e` and `slow`; about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
selection=()
if [[ ${1:-} == --fast ]]; then
  shift
  selection=(-m "not e2e and not slow")
fi
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
python -m pytest -q -rs --timeout=1500 "${selection[@]}" "$@"
