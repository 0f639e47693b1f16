#!/usr/bin/env bash
# Quickstart: set up, build the offline assets, and train a tiny model with verl's real trainer on CPU.
#   bash scripts/quickstart.sh                 # L2T (default)
#   ALGO=grpo bash scripts/quickstart.sh       # plain GRPO, same code path
#   DRY_RUN=1 bash scripts/quickstart.sh       # print the training command, build and run nothing
# Extra arguments are Hydra overrides passed to `python -m l2t_verl.main` (through l2t_verl.tiny_run,
# which the tests and CPU benchmarks train with too: preset=tiny holds the settings they share).
set -euo pipefail

ALGO=${ALGO:-l2t}                    # l2t | grpo
STEPS=${STEPS:-6}                    # training steps
BATCH=${BATCH:-8}                    # prompts per step
N=${N:-4}                            # samples per prompt (GRPO group size)
MAX_PROMPT=${MAX_PROMPT:-96}
MAX_RESPONSE=${MAX_RESPONSE:-96}
LR=${LR:-5e-5}
SEED=${SEED:-0}
ASSETS=${ASSETS:-assets}             # tiny tokenizer + model + arithmetic data (built offline)
OUT=${OUT:-outputs/quickstart_${ALGO}}

cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"

run=(--assets "$ASSETS" --out "$OUT" --algo "$ALGO" --steps "$STEPS" --batch "$BATCH" --n "$N"
  --data-seed "$SEED")
overrides=(
  data.max_prompt_length="$MAX_PROMPT"
  data.max_response_length="$MAX_RESPONSE"
  actor_rollout_ref.actor.optim.lr="$LR"
  trainer.experiment_name="quickstart_${ALGO}"
  "$@"
)
if [ "${DRY_RUN:-0}" = 1 ]; then
  python -m l2t_verl.tiny_run "${run[@]}" --dry-run -- "${overrides[@]}"
  exit 0
fi

echo "[quickstart] building offline assets in $ASSETS"
python -m l2t_verl.assets --output "$ASSETS" --seed "$SEED"

rm -rf "$OUT" && mkdir -p "$OUT"
echo "[quickstart] training: algo=$ALGO steps=$STEPS batch=$BATCH x n=$N (log: $OUT/train.log)"
# tiny_run writes the trainer's output to $OUT/train.log and its metrics to $OUT/metrics.jsonl.
python -m l2t_verl.tiny_run "${run[@]}" -- "${overrides[@]}" &
train_pid=$!
python -m l2t_verl.summary "$OUT/metrics.jsonl" --follow --pid "$train_pid"
if ! wait "$train_pid"; then
  echo "[quickstart] training failed; last lines of $OUT/train.log:" >&2
  tail -n 40 "$OUT/train.log" >&2
  exit 1
fi
python -m l2t_verl.summary "$OUT/metrics.jsonl" --wall-s $(( $(date +%s) - start )) \
  --checkpoint-dir "$OUT/checkpoints" --log-file "$OUT/train.log"
