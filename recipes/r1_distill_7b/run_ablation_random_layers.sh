#!/usr/bin/env bash
# DeepSeek-R1-Distill-Qwen-7B fine-tuned on the NuminaMath sample (paper Table 2):
# ablation: penalty proxy = a random 30% of layers instead of the low-rank SVD (Fig. 5/9, config 3).
# Usage: bash recipes/r1_distill_7b/run_ablation_random_layers.sh [hydra overrides...]
#        DRY_RUN=1 bash ...   prints the resolved config and starts nothing.
# Every variable below is overridable from the environment; the paper's hyperparameters are in
# ../common.sh. Data: scripts/data/prepare.py NAME --output "$DATA_DIR/NAME" (docs/reproduce.md).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-deepseek-ai/DeepSeek-R1-Distill-Qwen-7B}
DATA_DIR=${DATA_DIR:-$HOME/data/l2t}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/numina/train.parquet}
VAL_FILE=${VAL_FILE:-$DATA_DIR/aime24/test.parquet}
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ROLLOUT=${ROLLOUT:-vllm}        # vllm | sglang
ROLLOUT_TP=${ROLLOUT_TP:-2}     # rollout tensor parallel size
STRATEGY=${STRATEGY:-fsdp}      # fsdp (FSDP2) | megatron
TOTAL_EPOCHS=${TOTAL_EPOCHS:-2} # 4,000 // 256 = 15 steps an epoch: 30 steps
PROJECT_NAME=${PROJECT_NAME:-l2t_r1_distill_7b}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-ablation_random_layers}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$PROJECT_NAME/$EXPERIMENT_NAME}
CKPT_DIR=${CKPT_DIR:-$OUTPUT_DIR/checkpoints}
# A 7B model's logits alone are ~12 GB (fp32) per 20k tokens: one prompt + response per GPU pass.
MAX_TOKEN_LEN_PER_GPU=${MAX_TOKEN_LEN_PER_GPU:-20480}

ALGO=l2t
ALGO_OVERRIDES=(
  l2t.penalty.proxy=random_layers
)

# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
launch "$@"
