#!/usr/bin/env bash
# Answer a question about an image; prints only the answer. Same flags as test.py (and `vlm ask`):
#   bash test.sh --model runs/demo/model --image photo.png --prompt "What color is the circle?"
#   bash test.sh --base_language_model BASE --base_value_model TOWER --model_weights RUN \
#       --image_path IMG --prompt "这张图片是什么颜色？<|extra_0|>"   # Basic-VLM's line; <|extra_0|> is the image
#   bash test.sh                      # the trained demo model on the bundled example picture
# Runs from any folder: test.py is found beside this script; relative paths stay relative to where you are.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python "$here/test.py" "$@"
