#!/usr/bin/env bash
# Continued pretraining for people who drive training from shell scripts (as in MedicalGPT's run_pt.sh).
# Usage: scripts/run_pt.sh [CONFIG] [extra medtune pt options...]
#   NPROC=4 scripts/run_pt.sh configs/pt_glm4_9b_chat_lora.yaml --model_name_or_path /models/glm-4-9b-chat-hf
# NPROC>1 launches one process per GPU with torchrun; only rank 0 writes results.
set -euo pipefail
config=${1:-configs/pt_tiny.yaml}
shift || true
nproc=${NPROC:-1}
if [[ "$nproc" -gt 1 ]]; then
  exec torchrun --nproc_per_node "$nproc" -m medtune pt --config "$config" "$@"
fi
exec python -m medtune pt --config "$config" "$@"
