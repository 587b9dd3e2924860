#!/usr/bin/env bash
# Train with torchrun; the process count per machine comes from NPROC_PER_NODE (default 1). Arguments pass through:
#   NPROC_PER_NODE=8 bash train.sh --model_name_or_path Qwen/Qwen2.5-7B-Instruct --vision_tower ... --output_dir out
#   bash train.sh --base_language_model Qwen/Qwen2.5-1.5B --base_value_model google/siglip-base-patch16-224 \
#       --lora_rank 8 --lora_dropout 0.1 --feature_proj_lr 1e-4 --target_modules "c_attn|w1|w2" \
#       --image_map image_map.json --captions_file captions.json --output_dir out   # Basic-VLM's flags: LoRA
# Several machines: run it on each with the same NNODES, MASTER_ADDR and MASTER_PORT and its own NODE_RANK
# (0 .. NNODES-1); node 0's address is MASTER_ADDR:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 bash train.sh ... --deepspeed zero3
# With NNODES unset or 1 it runs on this machine alone (torchrun --standalone).
# With no arguments it runs the embedded demo. Runs from any folder: train.py is found beside this script,
# and relative paths in the arguments stay relative to the folder you start it from.
# VLM_TRAIN_DRY_RUN=1 prints the torchrun command instead of running it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nnodes="${NNODES:-1}"
if [[ "$nnodes" == "1" ]]; then
    launch=(--standalone)
else
    for name in NODE_RANK MASTER_ADDR MASTER_PORT; do
        if [[ -z "${!name:-}" ]]; then
            echo "train.sh: error: NNODES=$nnodes needs $name (the same MASTER_ADDR and MASTER_PORT on every node," \
                 "NODE_RANK 0..$((nnodes - 1)))" >&2
            exit 2
        fi
    done
    launch=(--nnodes "$nnodes" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
cmd=(torchrun "${launch[@]}" --nproc_per_node "${NPROC_PER_NODE:-1}" "$here/train.py" "$@")
if [[ -n "${VLM_TRAIN_DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
