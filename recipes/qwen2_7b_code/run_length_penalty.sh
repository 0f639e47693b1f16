#!/usr/bin/env bash
# Qwen2-7B-Instruct on code, evaluated with the HumanEval protocol (paper App. F.2, Fig. 8):
# length-penalty baseline (GRPO with a length cost in the reward, l2t_verl/length_penalty.py).
# Usage: bash recipes/qwen2_7b_code/run_length_penalty.sh [hydra overrides...]
#        DRY_RUN=1 bash ...   prints the resolved config and starts nothing.
# Every variable below is overridable from the environment; the paper's hyperparameters are in
# ../common.sh. Data: scripts/data/prepare.py NAME --output "$DATA_DIR/NAME" (docs/reproduce.md).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2-7B-Instruct}
DATA_DIR=${DATA_DIR:-$HOME/data/l2t}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/humaneval/test.parquet}
VAL_FILE=${VAL_FILE:-$DATA_DIR/humaneval/test.parquet}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ROLLOUT=${ROLLOUT:-vllm}        # vllm | sglang
ROLLOUT_TP=${ROLLOUT_TP:-2}     # rollout tensor parallel size
STRATEGY=${STRATEGY:-fsdp}      # fsdp (FSDP2) | megatron
TOTAL_EPOCHS=${TOTAL_EPOCHS:-10} # 164 // 32 = 5 steps an epoch: 50 steps
PROJECT_NAME=${PROJECT_NAME:-l2t_qwen2_7b_code}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-length_penalty}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$PROJECT_NAME/$EXPERIMENT_NAME}
CKPT_DIR=${CKPT_DIR:-$OUTPUT_DIR/checkpoints}
# The paper does not name its code training set and HumanEval has 164 problems: a batch of 256 (the
# paper's) would give zero steps, as verl drops the last partial batch. Train on a larger code set
# (TRAIN_FILE) to use TRAIN_BATCH=256; training on HumanEval and scoring on it is not held-out.
TRAIN_BATCH=${TRAIN_BATCH:-32}
PPO_MINI_BATCH=${PPO_MINI_BATCH:-8}
MAX_TOKEN_LEN_PER_GPU=${MAX_TOKEN_LEN_PER_GPU:-20480}

ALGO=length_penalty
ALGO_OVERRIDES=()

# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
launch "$@"
