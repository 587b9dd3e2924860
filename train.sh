#!/usr/bin/env bash
# Train with torchrun; the process count comes from NPROC_PER_NODE (default 1). Arguments pass through:
#   NPROC_PER_NODE=8 bash train.sh --model_name_or_path Qwen/Qwen2.5-7B-Instruct --vision_tower ... --output_dir out
#   bash train.sh --base_language_model Qwen/Qwen2.5-1.5B --base_value_model google/siglip-base-patch16-224 \
#       --lora_rank 8 --lora_dropout 0.1 --feature_proj_lr 1e-4 --target_modules "c_attn|w1|w2" \
#       --image_map image_map.json --captions_file captions.json --output_dir out   # Basic-VLM's flags: LoRA
# With no arguments it runs the embedded demo. Runs from any folder: train.py is found beside this script,
# and relative paths in the arguments stay relative to the folder you start it from.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec torchrun --standalone --nproc_per_node "${NPROC_PER_NODE:-1}" "$here/train.py" "$@"
