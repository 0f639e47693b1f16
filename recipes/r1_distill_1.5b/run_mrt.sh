#!/usr/bin/env bash
exec bash "$(dirname "$0")/../run.sh" r1_distill_1.5b mrt "$@"
