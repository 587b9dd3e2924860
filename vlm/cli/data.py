"""`vlm data {check,convert,filter,synth}`: thin command-line wrappers over `vlm.data`.

    vlm data check   --data_path data.json --image_folder images --report report.json \\
                     [--tokenizer PATH] [--template vicuna_v1] [--num_image_tokens 576] \\
                     [--model_max_length 2048] [--check_images full|exists|none] [--max_drop_ratio 0.01] \\
                     [--escape_special_tokens]
    vlm data convert --input captions.json [--format auto] --output llava.json
    vlm data filter  --data_path rs.json --image_folder rs_images --keep-prefix NWPU,RSICD,LR,DOTA \\
                     --output rs_4.json [--report filter_report.json]
    vlm data synth   ...   (see `vlm data synth --help`)

`--data_path` takes comma-separated files (with `--image_folder` one per file, or one for all, and
optional `--data_weights` repeat factors) or a YAML mix file (`vlm/data/mix.py`). Without
`--tokenizer`, `check` uses a stand-in tokenizer and skips the length check (`vlm/data/check.py`).
Exit status: 0 when fine; 1 when `check` drops more than `--max_drop_ratio`, `convert` writes
nothing, or `filter` finds kept images missing (the command ran; its verdict is no); 2 for a user
mistake (`vlm.errors`: bad flags, unreadable files), printed in one line by `vlm.cli.run`, which
runs `main` (`vlm data ...`, `python -m vlm.cli.data`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vlm.data.formats import FORMATS
from vlm.data.formats.common import CAPTION_MODES
from vlm.data.paths import CHECK_MODES

_READER_OPTIONS = {
    "prompt": "fixed question for caption sets (AI Challenger, Basic-VLM, COCO)",
    "caption_mode": f"caption sets: one sample per caption or one sampled caption per image {CAPTION_MODES}",
    "system": "system message for caption and question/answer sets",
    "image_map": "Basic-VLM image map (image id -> file); default: image_map.json beside the captions",
    "captions_file": "Basic-VLM captions file when --data_path is the image map",
    "image_column": "question/answer tables: image column (default image, or imgname)",
    "question_column": "question/answer tables: question column (default query)",
    "answer_column": "question/answer tables: answer column (default label)",
    "id_column": "question/answer tables: id column (default id)",
}


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _add_reader_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reader options (applied to the sources whose format takes them)")
    for name, help_ in _READER_OPTIONS.items():
        kwargs: dict[str, Any] = {"choices": CAPTION_MODES} if name == "caption_mode" else {}
        group.add_argument(f"--{name}", default=None, help=help_, **kwargs)
    parser.add_argument("--seed", type=int, default=0, help="seed for mixing and caption sampling (default 0)")


def _reader_options(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _READER_OPTIONS if getattr(args, name) is not None}


def _add_data_arguments(parser: argparse.ArgumentParser, *, mixing: bool) -> None:
    data = parser.add_argument_group("data")
    what = "comma-separated data files, or a YAML mix file" if mixing else "data file"
    data.add_argument("--data_path", required=True, help=what)
    data.add_argument("--image_folder", default=None, help="image folder (comma-separated: one per data file)")
    data.add_argument("--data_format", default="auto", help=f"auto or one of {', '.join(FORMATS)}")
    if mixing:
        data.add_argument("--data_weights", default=None,
                          help="comma-separated repeat factors, one per data file (2 = twice, 0.5 = a random half)")
    _add_reader_options(parser)


def build_parser() -> argparse.ArgumentParser:
    from vlm.hub import add_trust_remote_code_argument

    parser = argparse.ArgumentParser(prog="vlm data", description="Check, convert, filter or synthesise datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate a dataset and write the validation report")
    _add_data_arguments(check, mixing=True)
    check.add_argument("--report", default="report.json", help="report file to write (default report.json)")
    tokens = check.add_argument_group("tokenisation (as in training)")
    tokens.add_argument("--tokenizer", default=None, help="tokenizer folder; default: a stand-in, no length check")
    add_trust_remote_code_argument(tokens, "a --tokenizer folder")
    tokens.add_argument("--template", "--version", dest="template", default=None,
                        help="chat template or LLaVA --version (default: the tokenizer's own chat template when it has "
                             "one, else vicuna_v1, as training chooses)")
    tokens.add_argument("--num_image_tokens", type=int, default=576, help="tokens per image (default 576)")
    tokens.add_argument("--model_max_length", type=int, default=2048, help="longest sequence (default 2048)")
    tokens.add_argument("--truncate", choices=("none", "turns"), default="none", help="too long: drop (none) or keep first turns")
    tokens.add_argument("--escape_special_tokens", action="store_true",
                        help="tokenise special-token strings in the data (<|im_end|>, </s>, ...) as text, as training "
                             "does with the same flag (default: they become control tokens; counted in the notes)")
    check.add_argument("--check_images", choices=CHECK_MODES, default="full", help="decode images (full), look them up, or neither")
    check.add_argument("--allow_absolute_image_paths", action="store_true",
                       help="accept absolute image paths (each must resolve to a regular file)")
    check.add_argument("--max_drop_ratio", type=float, default=0.01, help="fail when more than this fraction is dropped")
    check.add_argument("--num_workers", type=int, default=None, help="checking processes (default: one per CPU, up to 8)")

    convert = sub.add_parser("convert", help="write any supported input as LLaVA JSON")
    convert.add_argument("--input", required=True, help="data file")
    convert.add_argument("--format", "--data_format", dest="format", default="auto", help=f"auto or one of {', '.join(FORMATS)}")
    convert.add_argument("--output", required=True, help="LLaVA JSON file to write")
    _add_reader_options(convert)

    filt = sub.add_parser("filter", help="keep/drop samples by source subset; check the image layout")
    _add_data_arguments(filt, mixing=False)
    filt.add_argument("--keep-prefix", "--keep_prefix", dest="keep_prefix", type=_csv, help="keep images under these prefixes")
    filt.add_argument("--drop-prefix", "--drop_prefix", dest="drop_prefix", type=_csv, help="drop images under these prefixes")
    filt.add_argument("--field", default=None, help="record field naming the subset (e.g. source)")
    filt.add_argument("--keep-values", "--keep_values", dest="keep_values", type=_csv, help="keep these --field values")
    filt.add_argument("--drop-values", "--drop_values", dest="drop_values", type=_csv, help="drop these --field values")
    filt.add_argument("--output", required=True, help="LLaVA JSON file to write")
    filt.add_argument("--report", default=None, help="JSON report: per-subset counts and missing images")

    sub.add_parser("synth", help="write the synthetic shapes demo set", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:  # its own parser, its own flags
        from vlm.data.synth import main as synth_main

        return int(synth_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return {"check": _check, "convert": _convert, "filter": _filter}[args.command](args)


def _check(args: argparse.Namespace) -> int:
    import dataclasses

    from vlm.data.check import check_dataset, drop_ratio_verdict
    from vlm.data.mix import parse_sources

    sources = [_basic_vlm_images(dataclasses.replace(source, allow_absolute_images=args.allow_absolute_image_paths),
                                 args) for source in parse_sources(
        args.data_path, args.image_folder, data_format=args.data_format, weights=args.data_weights,
        options=_reader_options(args),
    )]
    tokenizer = None
    if args.tokenizer:
        from vlm.data.tokenizer import ensure_image_token
        from vlm.hub import auto_tokenizer

        tokenizer = auto_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
        ensure_image_token(tokenizer)  # as training does; the model's embeddings grow to match
    if args.template is None:
        from vlm.data.templates import default_template_name

        args.template = default_template_name(tokenizer)
    _, report = check_dataset(
        sources, tokenizer=tokenizer, template=args.template, num_image_tokens=args.num_image_tokens,
        max_length=args.model_max_length, truncate=args.truncate, check_images=args.check_images, seed=args.seed,
        num_workers=args.num_workers, escape_special_tokens=args.escape_special_tokens,
    )
    _write_json(args.report, report)
    dropped = ", ".join(f"{r}={n}" for r, n in report["dropped"].items()) or "none"
    print(f"checked {report['total']} samples: kept {report['kept']}, dropped {dropped}; "
          f"image_prepended={report['notes']['image_prepended']}; report: {args.report}")
    for note in report["notes"]["skipped"]:
        print(f"skipped: {note}")
    duplicates, specials = report["notes"]["duplicate_ids"], report["notes"]["special_tokens"]
    if duplicates["samples"]:
        shown = ", ".join(repr(e["id"]) for e in duplicates["examples"])
        print(f"note: {duplicates['samples']} samples reuse the id of an earlier one ({duplicates['ids']} ids, e.g. "
              f"{shown}); kept, see notes.duplicate_ids")
    if specials["samples"]:
        counts = ", ".join(f"{t}={n}" for t, n in specials["counts"].items())
        how = ("escaped: tokenised as text (--escape_special_tokens)" if args.escape_special_tokens else
               "that tokenises as control tokens (--escape_special_tokens tokenises it as text)")
        print(f"note: {specials['samples']} samples hold special-token text ({counts}) {how}; kept, see "
              "notes.special_tokens")
    verdict = drop_ratio_verdict(report, args.max_drop_ratio, report_path=args.report)
    if verdict:  # the check ran and found the data failing: its result, exit 1 (a user mistake would be 2)
        print(f"vlm data check: {verdict}", file=sys.stderr)
        return 1
    return 0


def _basic_vlm_images(source, args: argparse.Namespace):
    """A Basic-VLM source without --image_folder finds its images where training does: the map's `path`s."""
    import dataclasses

    from vlm.data.formats.basic_vlm import image_folder_and_options

    basic_vlm = source.format == "basic_vlm" or (source.format == "auto" and (args.captions_file or args.image_map))
    if source.image_folder is not None or not basic_vlm:
        return source
    folder, options = image_folder_and_options(source.path, args.image_map, None)
    if folder is None:
        return source
    print(f"no --image_folder: images are found at the image map's 'path' folders (under {folder})")
    return dataclasses.replace(source, image_folder=folder, options={**source.options, "image_root": folder})


def _convert(args: argparse.Namespace) -> int:
    from vlm.data.convert import convert_file

    result = convert_file(args.input, args.output, format=args.format, seed=args.seed, **_reader_options(args))
    skipped = ", ".join(f"{r}={n}" for r, n in result["skipped"].items()) or "none"
    print(f"wrote {result['written']} samples ({result['format']} -> LLaVA JSON) to {args.output}; skipped: {skipped}")
    for problem in result["problems"][:5]:
        print(f"  skipped {problem['id']!r}: {problem['reason']}: {problem['detail']}")
    return 0 if result["written"] else 1


def _filter(args: argparse.Namespace) -> int:
    from vlm.data.filter import filter_file, format_report

    report = filter_file(
        args.data_path, args.output, image_folder=args.image_folder, keep_prefix=args.keep_prefix,
        drop_prefix=args.drop_prefix, field=args.field, keep_values=args.keep_values, drop_values=args.drop_values,
        format=args.data_format, seed=args.seed, **_reader_options(args),
    )
    if args.report:
        _write_json(args.report, report)
    print(format_report(report))
    missing = sum(s["missing_images"] for s in report["subsets"].values())
    return 1 if missing else 0


def _write_json(path: str, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    from vlm.cli import run

    sys.exit(run("vlm data", main))
