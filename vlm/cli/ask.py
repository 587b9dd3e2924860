"""`vlm ask` / `python test.py`: answer one question about one image and print only the answer.

    vlm ask --model runs/demo/model --image photo.png --prompt "What color is the circle?"
    vlm ask --model-path RUN --model-base BASE --image-file IMG --query "..."          (LLaVA's flags)
    vlm ask --model_weights RUN --base_language_model BASE --image_path IMG --prompt "..."  (Basic-VLM's)
    vlm ask                      (the demo model answers about the bundled example picture)

With no `--model` the demo model is used: `--demo_dir`, else `$VLM_DEMO_DIR`, else `./runs/demo` (its
`model/` folder). When it has not been trained there this stops and says so; `--train-demo` trains it
there first (8000 steps), so a stray `vlm ask` in some folder never starts a long run by itself.

The answer is streamed to the terminal as it is generated; when stdout is not a terminal it is printed
once, at the end. Notes and errors go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from vlm.errors import UserError


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from vlm.cli.options import add_decoding_arguments, add_model_arguments

    parser = argparse.ArgumentParser(prog=prog, description="Answer a question about an image with a vlm / LLaVA "
                                     "model; prints only the answer.")
    add_model_arguments(parser, required=False)
    parser.add_argument("--image", "--image-file", "--image_file", "--image_path", dest="image", default=None,
                        help="image file (default: the bundled example picture, vlm/assets/examples/shapes.png)")
    parser.add_argument("--prompt", "--query", dest="prompt", default=None,
                        help="the question (default: the bundled example's question)")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="print the answer only at the end")
    demo = parser.add_argument_group("demo model (used when no --model is given)")
    demo.add_argument("--demo_dir", "--demo-dir", dest="demo_dir", default=None,
                      help="the demo's run folder, whose model/ answers (default: $VLM_DEMO_DIR, else ./runs/demo)")
    demo.add_argument("--train-demo", "--train_demo", dest="train_demo", action="store_true",
                      help="train the demo model into --demo_dir first when it is not there (8000 steps)")
    add_decoding_arguments(parser)
    return parser


class MissingDemoModel(UserError):
    """No --model, and no demo model where the demo folder points: a usage mistake (exit code 2)."""


def demo_model(demo_dir: str | None, train: bool) -> str:
    """The demo model folder; trains it only when `train` is set (`--train-demo`)."""
    from vlm.demo import DEMO_DIR_ENV, demo_dir as resolve_demo_dir, demo_model_dir, ensure_demo_model

    run_dir = resolve_demo_dir(demo_dir)
    model_dir = demo_model_dir(run_dir)
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        return model_dir
    if not train:
        raise MissingDemoModel(
            f"no --model, and no demo model in {model_dir}: pass --model FOLDER, point --demo_dir (or "
            f"${DEMO_DIR_ENV}) at the run folder of a trained demo, or add --train-demo to train it in {run_dir} "
            "first (8000 steps; `vlm demo` says how long)")
    return str(ensure_demo_model(run_dir))


def fill_defaults(args: argparse.Namespace) -> None:
    """No model: the demo model; no image/prompt: the bundled example. Each choice is said on stderr."""
    from vlm.assets import example

    if args.model is None:
        args.model = demo_model(args.demo_dir, args.train_demo)
        print(f"using the demo model {args.model}", file=sys.stderr)
    image, question = example()
    if args.image is None:
        args.image = str(image)
        print(f"using the example image {args.image}", file=sys.stderr)
    if args.prompt is None:
        args.prompt = question
        print(f"question: {args.prompt}", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "vlm ask") -> int:
    """Runs under `vlm.cli.run` (`vlm ask`, test.py): a mistake is one line and exit 2, Ctrl-C one line."""
    from vlm.cli.options import generator_from_args

    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    fill_defaults(args)
    generator = generator_from_args(args)
    stream = sys.stdout if args.stream and sys.stdout.isatty() else None
    answer = generator.answer(args.prompt, args.image, stream=stream)
    if stream is None:
        print(answer)
    return 0
