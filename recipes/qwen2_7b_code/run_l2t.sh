#!/usr/bin/env bash
exec bash "$(dirname "$0")/../run.sh" qwen2_7b_code l2t "$@"
