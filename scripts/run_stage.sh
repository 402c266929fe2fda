#!/usr/bin/env bash
# Run a training stage from a YAML recipe, for people who drive training from shell scripts.
# Usage: scripts/run_stage.sh STAGE CONFIG [extra medtune options...]     (STAGE: pt, sft or dpo)
#   NPROC=4 scripts/run_stage.sh sft configs/sft_glm4_9b_chat_lora.yaml --model_name_or_path /models/glm4-med-pt
# NPROC>1 launches one process per GPU with torchrun; only rank 0 writes results.
set -euo pipefail
stage=${1:?usage: scripts/run_stage.sh pt|sft|dpo CONFIG [options...]}
config=${2:-configs/${stage}_tiny.yaml}
shift $(( $# >= 2 ? 2 : 1 ))
nproc=${NPROC:-1}
if [[ "$nproc" -gt 1 ]]; then
  exec torchrun --nproc_per_node "$nproc" -m medtune "$stage" --config "$config" "$@"
fi
exec python -m medtune "$stage" --config "$config" "$@"
