#!/usr/bin/env bash
# L2T, penalty on, on verl's Megatron engine, sized for A100-80G: TP 2 x PP 2 (DP = GPUs / 4; TRAIN_TP,
# TRAIN_PP override). The 7B model's bf16 weights are 15 GB; with its fp32 gradients and Adam states,
# a quarter of the model per GPU and the distributed optimizer's sharding of the Adam states over DP
# leave room for the activations of 16k-token responses. The default proxy, the last decoder layer's
# MLP, sits on the last pipeline stage.
STRATEGY=megatron TRAIN_TP=${TRAIN_TP:-2} TRAIN_PP=${TRAIN_PP:-2} \
  exec bash "$(dirname "$0")/../run.sh" qwen2_7b_code l2t "$@"
