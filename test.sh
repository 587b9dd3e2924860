#!/usr/bin/env bash
# Answer a question about an image; prints only the answer. Same flags as test.py:
#   bash test.sh --model runs/demo/model --image examples/shapes.png --prompt "What color is the circle?"
#   bash test.sh --base_language_model BASE --base_value_model TOWER --model_weights RUN \
#       --image_path IMG --prompt "这张图片是什么颜色？<|extra_0|>"   # Basic-VLM's line; <|extra_0|> is the image
#   bash test.sh                      # the demo model on the bundled example image
set -euo pipefail
exec python "$(dirname "$0")/test.py" "$@"
