#!/usr/bin/env bash
# DeepSeek-R1-Distill-Qwen-1.5B fine-tuned on a seeded random 4,000-problem NuminaMath sample (Table 1):
# GRPO baseline (outcome reward only; stock verl GRPO on the same code path).
# Usage: bash recipes/r1_distill_1.5b/run_grpo.sh [hydra overrides...]
#        DRY_RUN=1 bash ...   prints the resolved config and starts nothing.
# Every variable below is overridable from the environment; the paper's hyperparameters are in
# ../common.sh. Data: scripts/data/prepare.py NAME --output "$DATA_DIR/NAME" (docs/reproduce.md).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B}
DATA_DIR=${DATA_DIR:-$HOME/data/l2t}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/numina/train.parquet}
VAL_FILE=${VAL_FILE:-$DATA_DIR/aime24/test.parquet}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ROLLOUT=${ROLLOUT:-vllm}        # vllm | sglang
ROLLOUT_TP=${ROLLOUT_TP:-1}     # rollout tensor parallel size
STRATEGY=${STRATEGY:-fsdp}      # fsdp (FSDP2) | megatron
TOTAL_EPOCHS=${TOTAL_EPOCHS:-2} # 4,000 // 256 = 15 steps an epoch: 30 steps
PROJECT_NAME=${PROJECT_NAME:-l2t_r1_distill_1.5b}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-grpo}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$PROJECT_NAME/$EXPERIMENT_NAME}
CKPT_DIR=${CKPT_DIR:-$OUTPUT_DIR/checkpoints}

ALGO=grpo
ALGO_OVERRIDES=()

# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
launch "$@"
