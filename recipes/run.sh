#!/usr/bin/env bash
# Launch one run of the paper's recipes (recipes/README.md):
#   bash recipes/run.sh SETTING VARIANT [hydra overrides...]
#   DRY_RUN=1 bash recipes/run.sh r1_distill_1.5b l2t     # print the resolved config, start nothing
#
# SETTING is l2t_verl/config/recipe/SETTING.yaml: the setting's model, data, lengths, batch, epochs,
# cluster shape and the paper's hyperparameters, all in that one file. VARIANT is the method on top:
# l2t | grpo | length_penalty | mrt (algo=VARIANT, l2t_verl/config/algo/), or ablation_SWITCH
# (algo=l2t ablation=SWITCH, l2t_verl/config/ablation/SWITCH.yaml).
#
# Environment variables override the recipe's values when set (non-empty); ENV_KEYS below names the
# Hydra key of each. Besides those:
#   DATA_DIR          the data folder, in place of the recipes' ~/data/l2t; TRAIN_FILE, VAL_FILE: one file
#   EXPERIMENT_NAME   the run's name (default: VARIANT)
#   OUTPUT_DIR        train.log and metrics.jsonl (default: outputs/PROJECT_NAME/EXPERIMENT_NAME)
#   CKPT_DIR          checkpoints (default: OUTPUT_DIR/checkpoints)
#   STRATEGY          fsdp (verl's FSDP2 engine; the default) | megatron (model_engine=megatron)
#   TRAIN_TP          with STRATEGY=megatron, Megatron's tensor parallel size
#                     (actor_rollout_ref.actor.megatron.tensor_model_parallel_size; unset: verl's 1)
#   TRAIN_PP          with STRATEGY=megatron, Megatron's pipeline parallel size
#                     (actor_rollout_ref.actor.megatron.pipeline_model_parallel_size; unset: verl's 1).
#                     The reference model takes the actor's sizes; the 7B settings' run_l2t_megatron.sh
#                     default both to 2
#   CODE_FORCE_SUFFIX the forced answer's opening for J_r (l2t.progress.force_suffix)
#   PYTHON            the interpreter with l2t-verl installed (default: python)
# MAX_PROMPT_LENGTH or MAX_RESPONSE_LENGTH without MAX_TOKEN_LEN_PER_GPU scale the token budgets with
# them. Local paths become absolute: Ray workers do not share the launching shell's working directory.
# Extra arguments are Hydra overrides and win over everything here.
#
# DRY_RUN=1: resolve the full Hydra config and print it (YAML on stdout), start nothing. Needs neither the
# model nor the data nor a GPU.
set -euo pipefail

# VARIABLE=KEY: a variable that is set becomes the override KEY=VALUE.
ENV_KEYS=(
  MODEL_PATH=actor_rollout_ref.model.path
  NNODES=trainer.nnodes
  GPUS_PER_NODE=trainer.n_gpus_per_node
  ROLLOUT=actor_rollout_ref.rollout.name
  ROLLOUT_TP=actor_rollout_ref.rollout.tensor_model_parallel_size
  TOTAL_EPOCHS=trainer.total_epochs
  PROJECT_NAME=trainer.project_name
  LR=actor_rollout_ref.actor.optim.lr
  WEIGHT_DECAY=actor_rollout_ref.actor.optim.weight_decay
  WARMUP_RATIO=actor_rollout_ref.actor.optim.lr_warmup_steps_ratio
  TRAIN_BATCH=data.train_batch_size
  PPO_MINI_BATCH=actor_rollout_ref.actor.ppo_mini_batch_size
  ROLLOUT_N=actor_rollout_ref.rollout.n
  MAX_PROMPT_LENGTH=data.max_prompt_length
  MAX_RESPONSE_LENGTH=data.max_response_length
  MAX_TOKEN_LEN_PER_GPU=actor_rollout_ref.actor.ppo_max_token_len_per_gpu
  MAX_TOKEN_LEN_PER_GPU=actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu
  LOG_PROB_MICRO_BSZ=actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu
  GPU_MEMORY_UTILIZATION=actor_rollout_ref.rollout.gpu_memory_utilization
  ALPHA=l2t.alpha
  BETA=l2t.beta
  DAMPING=l2t.penalty.damping
  SAVE_FREQ=trainer.save_freq
  TEST_FREQ=trainer.test_freq
  LOGGER=trainer.logger
  SEED=data.seed
)
POSITIVE_INTEGERS=(
  NNODES GPUS_PER_NODE ROLLOUT_TP TOTAL_EPOCHS TRAIN_BATCH PPO_MINI_BATCH ROLLOUT_N TRAIN_TP TRAIN_PP
  MAX_PROMPT_LENGTH MAX_RESPONSE_LENGTH MAX_TOKEN_LEN_PER_GPU
)
# The recipes name their data files under this folder, which DATA_DIR replaces.
# shellcheck disable=SC2016 # a Hydra interpolation, not a shell expansion
RECIPE_DATA_DIR='${oc.env:HOME}/data/l2t'

PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The config of this checkout rather than of an installed copy: an edited recipe is the one that runs.
CONFIG_DIR=$(dirname "$HERE")/l2t_verl/config

die() {
  echo "l2t-verl recipe: configuration error: $*" >&2
  exit 2
}

names() { # GROUP [PREFIX]: the options of a config group
  local file found=()
  for file in "$CONFIG_DIR/$1"/*.yaml; do
    found+=("${2:-}$(basename "$file" .yaml)")
  done
  echo "${found[*]}"
}

variants() {
  echo "$(names algo) $(names ablation ablation_)"
}

abspath() {
  case "$1" in
    *://*) printf '%s' "$1" ;;
    *) realpath -m -- "$1" ;;
  esac
}

# A data file: FILE if set, else the recipe's RECIPE_FILE with DATA_DIR in place of its data folder.
data_file() { # FILE RECIPE_FILE
  if [[ -n $1 ]]; then
    abspath "$1"
    return
  fi
  case "$2" in
    "$RECIPE_DATA_DIR"/*) abspath "$DATA_DIR/${2#"$RECIPE_DATA_DIR"/}" ;;
    *\$\{*) printf '%s' "$2" ;; # another interpolation: Hydra's to resolve
    *) abspath "$2" ;;
  esac
}

# verl's YAML directory, found without importing verl (which loads torch and Ray: ~10 s) just to list
# it; then the recipe's values that the launcher builds on, as its file writes them. One a line.
recipe_lookup() { # RECIPE_FILE
  "$PYTHON" - "$1" <<'PY'
import importlib.util
import pathlib
import sys

import yaml

spec = importlib.util.find_spec("verl")
if spec is None:
    sys.exit(3)
print(pathlib.Path(spec.origin).parent / "trainer" / "config")
with open(sys.argv[1]) as f:
    recipe = yaml.safe_load(f)
print(recipe["trainer"]["project_name"])
print(recipe["data"]["train_files"])
print(recipe["data"]["val_files"])
print(recipe["data"]["max_prompt_length"])
print(recipe["data"]["max_response_length"])
print(recipe["actor_rollout_ref"]["actor"]["ppo_max_token_len_per_gpu"])
PY
}

if [[ $# -lt 2 ]]; then
  echo "usage: bash recipes/run.sh SETTING VARIANT [hydra overrides...]" >&2
  echo "  SETTING: $(names recipe)" >&2
  echo "  VARIANT: $(variants)" >&2
  exit 2
fi
setting=$1
variant=$2
shift 2
[[ -d $CONFIG_DIR ]] || die "no $CONFIG_DIR: recipes/ works from a checkout of l2t-verl (or the image's)"
[[ -f $CONFIG_DIR/recipe/$setting.yaml ]] || die "unknown SETTING '$setting'; one of: $(names recipe)"
case "$variant" in
  ablation_*) run=(algo=l2t "ablation=${variant#ablation_}") run_file=ablation/${variant#ablation_}.yaml ;;
  *) run=("algo=$variant") run_file=algo/$variant.yaml ;;
esac
[[ -f $CONFIG_DIR/$run_file ]] || die "unknown VARIANT '$variant'; one of: $(variants)"

case "${ROLLOUT:-vllm}" in
  vllm | sglang) ;;
  *) die "ROLLOUT must be vllm or sglang; got '$ROLLOUT'" ;;
esac
for var in "${POSITIVE_INTEGERS[@]}"; do
  [[ -z ${!var:-} || ${!var} =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive integer; got '${!var}'"
done

overrides=("recipe=$setting" "${run[@]}")
for entry in "${ENV_KEYS[@]}"; do
  var=${entry%%=*}
  [[ -z ${!var:-} ]] || overrides+=("${entry#*=}=${!var}")
done
if [[ -n ${CODE_FORCE_SUFFIX:-} ]]; then
  overrides+=("l2t.progress.force_suffix='$CODE_FORCE_SUFFIX'")
fi
case "${STRATEGY:-fsdp}" in
  fsdp) ;;
  megatron)
    overrides+=(model_engine=megatron)
    if [[ -n ${TRAIN_TP:-} ]]; then
      overrides+=(actor_rollout_ref.actor.megatron.tensor_model_parallel_size="$TRAIN_TP")
    fi
    if [[ -n ${TRAIN_PP:-} ]]; then
      overrides+=(actor_rollout_ref.actor.megatron.pipeline_model_parallel_size="$TRAIN_PP")
    fi
    ;;
  *) die "STRATEGY must be fsdp or megatron; got '$STRATEGY'" ;;
esac

status=0
lookup=$(recipe_lookup "$CONFIG_DIR/recipe/$setting.yaml") || status=$?
if [[ $status == 3 ]]; then
  die "PYTHON=$PYTHON cannot import verl: activate the environment (.venv or the Docker image)"
elif [[ $status != 0 ]]; then
  die "PYTHON=$PYTHON could not read $CONFIG_DIR/recipe/$setting.yaml (the error is above)"
fi
{
  read -r verl_config
  read -r recipe_project
  read -r recipe_train
  read -r recipe_val
  read -r recipe_prompt
  read -r recipe_response
  read -r recipe_budget
} <<<"$lookup"

if [[ -z ${MAX_TOKEN_LEN_PER_GPU:-} && -n ${MAX_PROMPT_LENGTH:-}${MAX_RESPONSE_LENGTH:-} ]]; then
  # The budgets must hold one prompt + response: they keep the recipe's ratio to it.
  length=$((${MAX_PROMPT_LENGTH:-$recipe_prompt} + ${MAX_RESPONSE_LENGTH:-$recipe_response}))
  budget=$((recipe_budget * length / (recipe_prompt + recipe_response)))
  overrides+=(
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$budget"
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu="$budget"
  )
fi
DATA_DIR=${DATA_DIR:-$HOME/data/l2t}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-$variant}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/${PROJECT_NAME:-$recipe_project}/$EXPERIMENT_NAME}
CKPT_DIR=${CKPT_DIR:-$OUTPUT_DIR/checkpoints}
overrides+=(
  data.train_files="$(data_file "${TRAIN_FILE:-}" "$recipe_train")"
  data.val_files="$(data_file "${VAL_FILE:-}" "$recipe_val")"
  trainer.experiment_name="$EXPERIMENT_NAME"
  trainer.default_local_dir="$(abspath "$CKPT_DIR")"
  "$@"
)

if [[ $DRY_RUN == 1 ]]; then
  {
    printf '[recipe] dry run: %s -m l2t_verl.main --config-path %q' "$PYTHON" "$CONFIG_DIR"
    printf ' %q' "${overrides[@]}"
    echo
  } >&2
  # Same YAML files as pkg://verl.trainer.config (l2t_trainer.yaml's search path), read from disk.
  exec "$PYTHON" -m l2t_verl.main --config-path "$CONFIG_DIR" "${overrides[@]}" \
    "hydra.searchpath=['file://$verl_config']" --cfg job --resolve
fi
output=$(abspath "$OUTPUT_DIR")
mkdir -p "$output"
export VERL_FILE_LOGGER_PATH=${VERL_FILE_LOGGER_PATH:-$output/metrics.jsonl}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
echo "[recipe] ${PROJECT_NAME:-$recipe_project}/$EXPERIMENT_NAME: log $output/train.log," \
  "metrics $VERL_FILE_LOGGER_PATH" >&2
"$PYTHON" -m l2t_verl.main --config-path "$CONFIG_DIR" "${overrides[@]}" 2>&1 | tee "$output/train.log"
