"""Answer a question about an image and print only the answer.

    python test.py --model runs/demo/model --image examples/shapes.png --prompt "What color is the circle?"
    python test.py --model-path RUN --model-base BASE --image-file IMG --query "..."       (LLaVA's flags)
    python test.py --model_weights RUN --base_language_model BASE --image_path IMG --prompt "..."  (Basic-VLM's)
    python test.py                   (no arguments: the demo model answers about examples/shapes.png)

The answer is streamed to the terminal as it is generated; when stdout is not a terminal it is printed
once, at the end. Notes and errors go to stderr. Flags: `python test.py --help`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent / "examples" / "shapes.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from vlm.generate import add_decoding_arguments, add_model_arguments

    parser = argparse.ArgumentParser(description="Answer a question about an image with a vlm / LLaVA model.")
    add_model_arguments(parser, required=False)
    parser.add_argument("--image", "--image-file", "--image_file", "--image_path", dest="image", default=None,
                        help="image file (default: the bundled examples/shapes.png)")
    parser.add_argument("--prompt", "--query", dest="prompt", default=None, help="the question")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="print the answer only at the end")
    add_decoding_arguments(parser)
    return parser.parse_args(argv)


def fill_defaults(args: argparse.Namespace) -> None:
    """No model: the demo model (trained first if missing); no image/prompt: the bundled example."""
    example = json.loads(EXAMPLE.read_text())
    if args.model is None:
        from vlm.demo import ensure_demo_model  # imported only when needed: it can train the demo

        args.model = str(ensure_demo_model())
        print(f"using the demo model {args.model}", file=sys.stderr)
    if args.image is None:
        args.image = str(EXAMPLE.parent / example["image"])
        print(f"using the example image {args.image}", file=sys.stderr)
    if args.prompt is None:
        args.prompt = example["question"]
        print(f"question: {args.prompt}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from vlm.generate import USER_ERRORS, generator_from_args

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        fill_defaults(args)
        generator = generator_from_args(args)
        stream = sys.stdout if args.stream and sys.stdout.isatty() else None
        answer = generator.answer(args.prompt, args.image, stream=stream)
    except USER_ERRORS as exc:
        print(f"test.py: error: {exc}", file=sys.stderr)
        return 1
    if stream is None:
        print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
