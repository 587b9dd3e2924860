"""Answer a question about an image and print only the answer: `vlm ask` (vlm/cli/ask.py) under its old name.

    python test.py --model runs/demo/model --image photo.png --prompt "What color is the circle?"
    python test.py --model-path RUN --model-base BASE --image-file IMG --query "..."       (LLaVA's flags)
    python test.py --model_weights RUN --base_language_model BASE --image_path IMG --prompt "..."  (Basic-VLM's)
    python test.py                   (the trained demo model answers about the bundled example picture)

Flags: `python test.py --help`.
"""

import sys
from functools import partial

from vlm.cli import run
from vlm.cli.ask import main as ask_main


def main(argv: list[str] | None = None) -> int:
    """`vlm ask` as test.py, under the error policy of `vlm.cli.run` (a mistake: one line, exit 2)."""
    return run("test.py", partial(ask_main, prog="test.py"), argv)


if __name__ == "__main__":
    sys.exit(main())
