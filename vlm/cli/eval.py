"""`vlm eval --model M --data_path D [--image_folder F] --metric vqa|chartqa|choice|exact|caption`: score a model.

    vlm eval --model runs/demo/model --data_path runs/demo/data/eval.json \\
        --image_folder runs/demo/data/images --metric exact --output_dir runs/demo/eval
    vlm eval --model llava-v1.5-7b --data_path vqav2_val.jsonl --image_folder coco/val2014 \\
        --metric vqa --references_field answers --output_dir eval/vqav2

Any model the library loads (vlm folder, LoRA run, LLaVA-1.5, llava-hf; `vlm.generate.generator`), prompted
with the template its folder records (`--template` another: an error when it prompts differently, unless
`--force-template`); any data file the readers read (`--data_format`, detected by default). References are
the final assistant reply of each record, or `--references_field NAME`: the record's field NAME (a list such
as VQA's ten answers, or a JSON list in a CSV cell). Writes `predictions.jsonl` and `metrics.json` into
`--output_dir` (`vlm.eval.evaluate`), and prints the metrics. The blind baseline (images shuffled across
samples) is on by default for exact and vqa where the images can be shuffled (metrics.json says why when they
cannot); `--no-blind` skips it, `--blind` adds it to the other metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys

from vlm.errors import UserError
from vlm.eval.evaluate import METRICS_FILE, PREDICTIONS_FILE, evaluate, metrics_record, write_outputs
from vlm.eval.items import read_items
from vlm.eval.metrics import METRIC_NAMES, check_metric
from vlm.eval.metrics.caption import TOKENIZERS

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
BLIND_BY_DEFAULT = ("exact", "vqa")
EVAL_READER_OPTIONS = ("caption_mode",)  # left out: evaluation takes every caption of an image as a reference


def build_parser() -> argparse.ArgumentParser:
    from vlm.cli.options import add_decoding_arguments, add_model_arguments
    from vlm.data.formats import FORMATS

    parser = argparse.ArgumentParser(prog="vlm eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--template", dest="conv_mode", default=None,
                        help="chat template (as --conv-mode; default: the one the model folder records; another one "
                             "is an error unless --force-template)")
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", required=True, help="the evaluation set: LLaVA JSON, a QA table, ... (any format "
                                                         "`vlm data check` reads)")
    data.add_argument("--image_folder", default=None, help="the folder the records' image paths are relative to")
    data.add_argument("--data_format", default="auto", choices=("auto", *FORMATS), help="default: detected")
    from vlm.cli.data import _READER_OPTIONS  # the reader flags `vlm data check` takes, with the same names

    for name, help_ in _READER_OPTIONS.items():
        if name not in EVAL_READER_OPTIONS:
            data.add_argument(f"--{name}", default=None, help=help_)
    data.add_argument("--references_field", default=None,
                      help="the record field holding the reference answers (a list, e.g. VQA's 'answers'; or one "
                           "answer); default: each record's final assistant reply")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--metric", default="exact", help=f"one of {', '.join(METRIC_NAMES)} (default exact)")
    scoring.add_argument("--blind", action=argparse.BooleanOptionalAction, default=None,
                         help="also score the model with the images shuffled across samples (default: on for "
                              f"{' and '.join(BLIND_BY_DEFAULT)})")
    scoring.add_argument("--caption_tokenizer", default="auto", choices=TOKENIZERS,
                         help="caption tokenisation: ptb (pycocoevalcap's, needs Java), python, auto (ptb when Java is "
                              "installed)")
    scoring.add_argument("--batch_size", type=int, default=16, help="questions decoded together (default 16)")
    add_decoding_arguments(parser, max_new_tokens=64)
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default=None, help=f"write {PREDICTIONS_FILE} and {METRICS_FILE} here")
    output.add_argument("--output", default=None, help=f"also write the metrics JSON ({METRICS_FILE}'s content) to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size} must be >= 1")
    metric = check_metric(args.metric)
    template = _template(args, argv if argv is not None else sys.argv[1:])
    # before the model is loaded: a wrong flag or record costs seconds, not an evaluation
    items = read_items(args.data_path, metric=metric, image_folder=args.image_folder,
                       references_field=args.references_field, data_format=args.data_format,
                       reader_options=_reader_options(args))
    blind, blind_skipped = _blind(args.blind, metric, items, args.seed or 0)
    print(f"template: {template!r}", file=sys.stderr)
    generator = _generator(args, template)
    result = evaluate(generator, items, metric, image_folder=args.image_folder, batch_size=args.batch_size,
                      blind=blind, seed=args.seed or 0, caption_tokenizer=args.caption_tokenizer,
                      progress=sys.stderr.isatty())
    context = {"model": args.model, "template": template, "data_path": args.data_path,
               "references": _references_source(args.references_field), "max_new_tokens": args.max_new_tokens,
               "temperature": args.temperature}
    if blind_skipped:
        context["blind_skipped"] = blind_skipped
    record = metrics_record(result, **context)
    text = json.dumps(record, indent=2)
    print(text)  # first: a full disk or a bad --output must not cost the evaluation
    summary = " ".join(f"{name}={value:.4f}" for name, value in result.scores.items())
    if result.blind_scores is not None:
        summary += " " + " ".join(f"blind_{name}={value:.4f}" for name, value in result.blind_scores.items())
    print(summary)
    for flag, write in (("--output_dir", lambda: write_outputs(args.output_dir, result, **context)),
                        ("--output", lambda: _write_text(args.output, text + "\n"))):
        target = getattr(args, flag[2:])
        if target is None:
            continue
        try:
            write()
        except OSError as exc:
            reason = "no space left on device" if exc.errno in DISK_FULL else (exc.strerror or str(exc))
            raise UserError(f"{reason} writing {flag} {target!r}; the result is printed above: free space or "
                            f"choose another {flag}") from None
    return 0


def _template(args, argv: list[str]) -> str:
    """The template to prompt with, checked against the model folder's record before anything heavy is loaded."""
    from vlm.folders.kinds import load_tokenizer, resolve_model_path
    from vlm.generate.prompts import choose_template
    from vlm.hub import check_remote_code

    folder = resolve_model_path(args.model)
    check_remote_code(folder, args.trust_remote_code)
    tokenizer = load_tokenizer(folder, trust_remote_code=args.trust_remote_code)
    flag = "--template" if any(a.split("=")[0] == "--template" for a in argv) else "--conv-mode"
    return choose_template(folder, args.conv_mode, tokenizer, force=args.force_template, flag=flag)


def _generator(args, template: str):
    """The model the flags name (`vlm.cli.options.generator_from_args`), prompted with `template`."""
    from vlm.cli.options import generator_from_args
    from vlm.processing import stop_token_ids

    generator = generator_from_args(argparse.Namespace(**{**vars(args), "conv_mode": None, "force_template": False}))
    stop_token_ids(generator.tokenizer, template)  # the template renders for this tokenizer
    return dataclasses.replace(generator, template=template)


def _blind(requested: bool | None, metric: str, items, seed: int) -> tuple[bool, str | None]:
    """(run the blind baseline, why the default one is skipped). Asked for with --blind, a set whose images cannot
    be shuffled is an error; by default (exact, vqa) it is skipped and the reason goes into metrics.json."""
    from vlm.eval.evaluate import blind_order

    if requested is not None or metric not in BLIND_BY_DEFAULT:
        if requested:
            blind_order(items, seed)  # the error now, before the model loads
        return bool(requested), None
    try:
        blind_order(items, seed)
    except UserError as exc:
        return False, str(exc).split(";")[0]
    return True, None


def _reader_options(args) -> dict:
    from vlm.cli.data import _READER_OPTIONS

    return {name: getattr(args, name) for name in _READER_OPTIONS
            if name not in EVAL_READER_OPTIONS and getattr(args, name) is not None}


def _references_source(field: str | None) -> str:
    return f"field {field!r}" if field else "final assistant reply"


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
