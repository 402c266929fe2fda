#!/usr/bin/env bash
# Run a training stage from a YAML recipe, for people who drive training from shell scripts.
# Usage: scripts/run_stage.sh STAGE CONFIG [extra medtune options...]     (STAGE: pt, sft or dpo)
#   scripts/run_stage.sh sft configs/sft_tiny.yaml                         one process
#   NPROC=8 scripts/run_stage.sh sft configs/sft_glm4_9b_chat_lora.yaml --deepspeed configs/deepspeed/zero2.json
#   multi-node (run on every node, same MASTER_ADDR/MASTER_PORT, NODE_RANK 0..NNODES-1):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC=8 scripts/run_stage.sh sft configs/sft_glm4_9b_chat_lora.yaml
# NPROC>1 or NNODES>1 launches one process per GPU (per CPU slot on a machine without GPUs) with torchrun; the
# processes form one data-parallel run and only global rank 0 writes results.
set -euo pipefail
stage=${1:?usage: scripts/run_stage.sh pt|sft|dpo CONFIG [options...]}
config=${2:-configs/${stage}_tiny.yaml}
shift $(( $# >= 2 ? 2 : 1 ))
nproc=${NPROC:-1}
nnodes=${NNODES:-1}
if [[ "$nnodes" -gt 1 ]]; then
  exec torchrun --nnodes "$nnodes" --node_rank "${NODE_RANK:?set NODE_RANK (0 on the master node)}" \
    --nproc_per_node "$nproc" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the rank-0 node}" \
    --master_port "${MASTER_PORT:-29500}" -m medtune "$stage" --config "$config" "$@"
fi
if [[ "$nproc" -gt 1 ]]; then
  exec torchrun --standalone --nproc_per_node "$nproc" -m medtune "$stage" --config "$config" "$@"
fi
exec python -m medtune "$stage" --config "$config" "$@"
