#!/usr/bin/env bash
# Train with torchrun; the process count comes from NPROC_PER_NODE (default 1). Arguments pass through:
#   NPROC_PER_NODE=8 bash train.sh --model_name_or_path Qwen/Qwen2.5-7B-Instruct --vision_tower ... --output_dir out
# With no arguments it runs the embedded demo.
set -euo pipefail
cd "$(dirname "$0")"
exec torchrun --standalone --nproc_per_node "${NPROC_PER_NODE:-1}" train.py "$@"
