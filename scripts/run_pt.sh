#!/usr/bin/env bash
# Continued pretraining from a shell script (as in MedicalGPT's run_pt.sh).
# Usage: scripts/run_pt.sh [CONFIG] [extra medtune pt options...]
#   NPROC=4 scripts/run_pt.sh configs/pt_glm4_9b_chat_lora.yaml --model_name_or_path /models/glm-4-9b-chat-hf
exec "$(dirname "$0")/run_stage.sh" pt "${@:-configs/pt_tiny.yaml}"
