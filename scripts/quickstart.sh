#!/usr/bin/env bash
# Quickstart: set up, build the offline assets, and train a tiny model with verl's real trainer on CPU.
#   bash scripts/quickstart.sh                 # L2T (default)
#   ALGO=grpo bash scripts/quickstart.sh       # plain GRPO, same code path
# Extra arguments are Hydra overrides passed to `python -m l2t_verl.main`.
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

echo "[quickstart] building offline assets in $ASSETS"
python -m l2t_verl.assets --output "$ASSETS" --seed "$SEED"

rm -rf "$OUT" && mkdir -p "$OUT"
export VERL_FILE_LOGGER_PATH="$OUT/metrics.jsonl" RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
echo "[quickstart] training: algo=$ALGO steps=$STEPS batch=$BATCH x n=$N (log: $OUT/train.log)"
python -m l2t_verl.main preset=cpu task=arith algo="$ALGO" \
  data.train_files="$ASSETS/data/train.parquet" \
  data.val_files="$ASSETS/data/test.parquet" \
  data.train_batch_size="$BATCH" \
  data.max_prompt_length="$MAX_PROMPT" \
  data.max_response_length="$MAX_RESPONSE" \
  data.seed="$SEED" \
  actor_rollout_ref.model.path="$ASSETS/model" \
  actor_rollout_ref.rollout.n="$N" \
  actor_rollout_ref.actor.optim.lr="$LR" \
  actor_rollout_ref.actor.ppo_mini_batch_size="$BATCH" \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=$((BATCH * N)) \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=$((BATCH * N)) \
  actor_rollout_ref.actor.use_kl_loss=false \
  actor_rollout_ref.actor.checkpoint.save_contents='[model,optimizer,extra,hf_model]' \
  trainer.total_training_steps="$STEPS" \
  trainer.save_freq="$STEPS" \
  trainer.default_local_dir="$OUT/checkpoints" \
  trainer.experiment_name="quickstart_${ALGO}" \
  trainer.logger='[console,file]' \
  "$@" > "$OUT/train.log" 2>&1 &
train_pid=$!
python -m l2t_verl.summary "$OUT/metrics.jsonl" --follow --pid "$train_pid"
if ! wait "$train_pid"; then
  echo "[quickstart] training failed; last lines of $OUT/train.log:" >&2
  tail -n 40 "$OUT/train.log" >&2
  exit 1
fi
python -m l2t_verl.summary "$OUT/metrics.jsonl" --wall-s $(( $(date +%s) - start )) \
  --checkpoint-dir "$OUT/checkpoints" --log-file "$OUT/train.log"
