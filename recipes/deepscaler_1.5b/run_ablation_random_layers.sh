#!/usr/bin/env bash
# DeepScaleR-1.5B-Preview fine-tuned on the 919 AIME problems of 1989-2023 (paper Table 1):
# ablation: penalty proxy = a random 30% of layers instead of the low-rank SVD (Fig. 5/9, config 3).
# Usage: bash recipes/deepscaler_1.5b/run_ablation_random_layers.sh [hydra overrides...]
#        DRY_RUN=1 bash ...   prints the resolved config and starts nothing.
# Every variable below is overridable from the environment; the paper's hyperparameters are in
# ../common.sh. Data: scripts/data/prepare.py NAME --output "$DATA_DIR/NAME" (docs/reproduce.md).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-agentica-org/DeepScaleR-1.5B-Preview}
DATA_DIR=${DATA_DIR:-$HOME/data/l2t}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/aime_1989_2023/train.parquet}
VAL_FILE=${VAL_FILE:-$DATA_DIR/aime24/test.parquet}
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
ROLLOUT=${ROLLOUT:-vllm}        # vllm | sglang
ROLLOUT_TP=${ROLLOUT_TP:-1}     # rollout tensor parallel size
STRATEGY=${STRATEGY:-fsdp}      # fsdp (FSDP2) | megatron
TOTAL_EPOCHS=${TOTAL_EPOCHS:-10} # 919 // 256 = 3 steps an epoch (verl drops a partial batch): 30 steps
PROJECT_NAME=${PROJECT_NAME:-l2t_deepscaler_1.5b}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-ablation_random_layers}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/$PROJECT_NAME/$EXPERIMENT_NAME}
CKPT_DIR=${CKPT_DIR:-$OUTPUT_DIR/checkpoints}

ALGO=l2t
ALGO_OVERRIDES=(
  l2t.penalty.proxy=random_layers
)

# shellcheck source=../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
launch "$@"
