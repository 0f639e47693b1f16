#!/usr/bin/env bash
exec bash "$(dirname "$0")/../run.sh" deepscaler_1.5b grpo "$@"
