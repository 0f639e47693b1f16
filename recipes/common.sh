# Shared part of the paper recipes: sourced by recipes/*/run_*.sh after they set their variables.
#
# The run script sets (at its top, each overridable from the environment):
#   MODEL_PATH DATA_DIR TRAIN_FILE VAL_FILE NNODES GPUS_PER_NODE ROLLOUT ROLLOUT_TP STRATEGY TOTAL_EPOCHS
#   PROJECT_NAME EXPERIMENT_NAME OUTPUT_DIR CKPT_DIR, then ALGO (l2t | grpo | length_penalty) and the
#   array ALGO_OVERRIDES (the Hydra overrides that make this run a baseline or an ablation),
# and then calls `launch "$@"` (extra arguments are Hydra overrides and win over everything here).
#
# The paper's hyperparameters (Sec. 5.1 and App. E) are the defaults below; each is overridable from the
# environment too (e.g. `LR=2e-6 bash recipes/.../run_l2t.sh`).
#
# DRY_RUN=1: resolve the full Hydra config and print it (YAML on stdout), start nothing. Needs neither the
# model nor the data nor a GPU.

LR=${LR:-1e-6}                                   # paper: learning rate 1e-6
WEIGHT_DECAY=${WEIGHT_DECAY:-0.01}               # paper: weight decay 0.01
WARMUP_RATIO=${WARMUP_RATIO:-0.1}                # paper: cosine schedule, warm-up ratio 0.1
TRAIN_BATCH=${TRAIN_BATCH:-256}                  # paper: batch size 256 (prompts per step)
PPO_MINI_BATCH=${PPO_MINI_BATCH:-64}             # ours: 4 optimizer steps per batch (paper: not stated)
ROLLOUT_N=${ROLLOUT_N:-8}                        # ours: GRPO group size (paper: not stated)
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-4096}     # paper: max prompt 4,096 tokens
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-16384} # paper: max completion 16,384 tokens
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.8} # paper: vLLM GPU memory utilization 0.8
ALPHA=${ALPHA:-0.8}                              # paper: alpha (eq. 5)
BETA=${BETA:-0.6}                                # paper: beta (eq. 3)
DAMPING=${DAMPING:-1e-5}                         # paper: Fisher damping 1e-5
TRAIN_TP=${TRAIN_TP:-1}                          # megatron tensor parallel size (STRATEGY=megatron)
# Tokens per GPU per forward/backward (dynamic batching); must hold one prompt + response.
MAX_TOKEN_LEN_PER_GPU=${MAX_TOKEN_LEN_PER_GPU:-$(((MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH) * 2))}
# Responses per micro-batch of verl's log-prob forward (the L2T penalty cuts its own micro-batches by
# l2t.penalty.max_token_len, which defaults to rollout.log_prob_max_token_len_per_gpu).
LOG_PROB_MICRO_BSZ=${LOG_PROB_MICRO_BSZ:-1}
SAVE_FREQ=${SAVE_FREQ:-10}
TEST_FREQ=${TEST_FREQ:-5}
LOGGER=${LOGGER:-[console,file]}                 # add wandb: LOGGER='[console,file,wandb]'
SEED=${SEED:-42}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

_recipe_die() {
  echo "l2t-verl recipe: configuration error: $*" >&2
  exit 2
}

# Local paths become absolute: Ray workers do not share the launching shell's working directory.
_recipe_abspath() {
  case "$1" in
    *://*) printf '%s' "$1" ;;
    *) realpath -m -- "$1" ;;
  esac
}

# The Hydra overrides of this run, in the array RECIPE_OVERRIDES.
recipe_overrides() {
  case "$ROLLOUT" in
    vllm | sglang) ;;
    *) _recipe_die "ROLLOUT must be vllm or sglang; got '$ROLLOUT'" ;;
  esac
  case "$ALGO" in
    l2t | grpo | length_penalty) ;;
    *) _recipe_die "ALGO must be l2t, grpo or length_penalty; got '$ALGO'" ;;
  esac
  for var in NNODES GPUS_PER_NODE ROLLOUT_TP TOTAL_EPOCHS TRAIN_BATCH PPO_MINI_BATCH ROLLOUT_N; do
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || _recipe_die "$var must be a positive integer; got '${!var}'"
  done
  local all=" ${ALGO_OVERRIDES[*]} $* "
  local penalty_off=0
  if [[ $all == *" l2t.penalty.enable=false "* || $all =~ \ l2t\.beta=0*\.?0*\  || $BETA =~ ^0*\.?0*$ ]]; then
    penalty_off=1
  fi
  local strategy_overrides
  case "$STRATEGY" in
    fsdp)
      # FSDP2: the L2T penalty reads the proxy weights as DTensors (l2t_verl/worker_extension.py).
      strategy_overrides=(
        actor_rollout_ref.actor.strategy=fsdp2
        actor_rollout_ref.ref.strategy=fsdp2
        actor_rollout_ref.actor.fsdp_config.dtype=bfloat16
        actor_rollout_ref.actor.optim.lr_scheduler_type=cosine
      )
      ;;
    megatron)
      # The penalty is computed on the FSDP2 engine's modules only; refuse rather than fail on the cluster.
      if [[ $ALGO == l2t && $penalty_off == 0 ]]; then
        _recipe_die "STRATEGY=megatron: the L2T compression penalty runs on the FSDP2 engine only;" \
          "use STRATEGY=fsdp, or disable it (l2t.penalty.enable=false)"
      fi
      strategy_overrides=(
        model_engine=megatron
        actor_rollout_ref.actor.megatron.dtype=bfloat16
        actor_rollout_ref.actor.megatron.tensor_model_parallel_size="$TRAIN_TP"
        actor_rollout_ref.actor.optim.lr_decay_style=cosine
      )
      ;;
    *) _recipe_die "STRATEGY must be fsdp or megatron; got '$STRATEGY'" ;;
  esac

  RECIPE_OVERRIDES=(
    algo="$ALGO"
    data.train_files="$(_recipe_abspath "$TRAIN_FILE")"
    data.val_files="$(_recipe_abspath "$VAL_FILE")"
    data.train_batch_size="$TRAIN_BATCH"
    data.max_prompt_length="$MAX_PROMPT_LENGTH"
    data.max_response_length="$MAX_RESPONSE_LENGTH"
    data.filter_overlong_prompts=true
    data.truncation=error
    data.seed="$SEED"
    actor_rollout_ref.model.path="$MODEL_PATH"
    actor_rollout_ref.model.use_remove_padding=true
    actor_rollout_ref.model.enable_gradient_checkpointing=true
    actor_rollout_ref.actor.optim.lr="$LR"
    actor_rollout_ref.actor.optim.weight_decay="$WEIGHT_DECAY"
    actor_rollout_ref.actor.optim.lr_warmup_steps_ratio="$WARMUP_RATIO"
    "${strategy_overrides[@]}"
    actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH"
    actor_rollout_ref.actor.use_dynamic_bsz=true
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$MAX_TOKEN_LEN_PER_GPU"
    # The paper reports no KL term; without it no reference model is loaded.
    actor_rollout_ref.actor.use_kl_loss=false
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.checkpoint.save_contents='[model,optimizer,extra,hf_model]'
    actor_rollout_ref.rollout.name="$ROLLOUT"
    actor_rollout_ref.rollout.dtype=bfloat16
    actor_rollout_ref.rollout.n="$ROLLOUT_N"
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
    actor_rollout_ref.rollout.gpu_memory_utilization="$GPU_MEMORY_UTILIZATION"
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu="$MAX_TOKEN_LEN_PER_GPU"
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$LOG_PROB_MICRO_BSZ"
    trainer.nnodes="$NNODES"
    trainer.n_gpus_per_node="$GPUS_PER_NODE"
    trainer.total_epochs="$TOTAL_EPOCHS"
    trainer.project_name="$PROJECT_NAME"
    trainer.experiment_name="$EXPERIMENT_NAME"
    trainer.default_local_dir="$(_recipe_abspath "$CKPT_DIR")"
    trainer.save_freq="$SAVE_FREQ"
    trainer.test_freq="$TEST_FREQ"
    trainer.val_before_train=true
    trainer.logger="$LOGGER"
  )
  if [[ $ALGO == l2t ]]; then
    RECIPE_OVERRIDES+=(l2t.alpha="$ALPHA" l2t.beta="$BETA" l2t.penalty.damping="$DAMPING")
  fi
  RECIPE_OVERRIDES+=("${ALGO_OVERRIDES[@]}" "$@")
}

# verl's YAML directory, found without importing verl (which loads torch and Ray: ~10 s) just to list it.
_verl_config_dir() {
  "$PYTHON" -c 'import importlib.util, pathlib, sys
spec = importlib.util.find_spec("verl")
sys.exit(1) if spec is None else print(pathlib.Path(spec.origin).parent / "trainer" / "config")' ||
    _recipe_die "PYTHON=$PYTHON cannot import verl: activate the environment (.venv or the Docker image)"
}

launch() {
  recipe_overrides "$@"
  if [[ $DRY_RUN == 1 ]]; then
    # Same YAML files as pkg://verl.trainer.config (l2t_trainer.yaml's search path), read from disk.
    local verl_config
    verl_config=$(_verl_config_dir)
    {
      printf '[recipe] dry run: %s -m l2t_verl.main' "$PYTHON"
      printf ' %q' "${RECIPE_OVERRIDES[@]}"
      echo
    } >&2
    exec "$PYTHON" -m l2t_verl.main "${RECIPE_OVERRIDES[@]}" "hydra.searchpath=['file://$verl_config']" \
      --cfg job --resolve
  fi
  local out
  out=$(_recipe_abspath "$OUTPUT_DIR")
  mkdir -p "$out"
  export VERL_FILE_LOGGER_PATH=${VERL_FILE_LOGGER_PATH:-$out/metrics.jsonl}
  export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
  echo "[recipe] $PROJECT_NAME/$EXPERIMENT_NAME: log $out/train.log, metrics $VERL_FILE_LOGGER_PATH" >&2
  set -o pipefail
  "$PYTHON" -m l2t_verl.main "${RECIPE_OVERRIDES[@]}" 2>&1 | tee "$out/train.log"
}
