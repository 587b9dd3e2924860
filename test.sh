#!/usr/bin/env bash
# Answer a question about an image; prints only the answer. Same flags as test.py:
#   bash test.sh --model runs/demo/model --image examples/shapes.png --prompt "What color is the circle?"
#   bash test.sh                      # the demo model on the bundled example image
set -euo pipefail
exec python "$(dirname "$0")/test.py" "$@"
