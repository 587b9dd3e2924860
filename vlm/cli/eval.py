"""`vlm eval --model FOLDER --data_path eval.json --image_folder images`: exact-match accuracy with a blind baseline.

The work (and why the blind baseline) is in `vlm.eval.evaluate`. The chat template is the one the model folder
records; `--template` names another, an error when it prompts differently unless `--force-template`.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys

from vlm.errors import UserError
from vlm.eval.evaluate import evaluate_exact_match, read_eval_records
from vlm.generate.prompts import choose_template

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def main(argv: list[str] | None = None) -> int:
    from vlm.hub import add_trust_remote_code_argument

    parser = argparse.ArgumentParser(prog="vlm eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="vlm model folder")
    parser.add_argument("--data_path", required=True, help="LLaVA JSON with one question and answer per record")
    parser.add_argument("--image_folder", required=True)
    parser.add_argument("--template", default=None,
                        help="chat template (default: the one the model folder records it was trained with; another "
                             "one is an error unless --force-template)")
    parser.add_argument("--force-template", "--force_template", dest="force_template", action="store_true",
                        help="use --template even when the model folder records another template")
    parser.add_argument("--batch_size", type=int, default=64)
    add_trust_remote_code_argument(parser)
    parser.add_argument("--output", help="write the result JSON here")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size} must be >= 1")
    import vlm
    from vlm.hub import auto_tokenizer
    from vlm.visual.processor import ImageProcessor

    # before the model is loaded: a wrong flag or record costs seconds, not an evaluation
    tokenizer = auto_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    template = choose_template(args.model, args.template, tokenizer, force=args.force_template, flag="--template")
    records = read_eval_records(args.data_path, args.image_folder)
    print(f"template: {template!r}", file=sys.stderr)
    model = vlm.from_pretrained(args.model)
    processor = ImageProcessor.from_pretrained(args.model)
    result = evaluate_exact_match(model, tokenizer, processor, records, args.image_folder, template=template,
                                  batch_size=args.batch_size)
    text = json.dumps(result, indent=2)
    print(text)  # first: a full disk or a bad --output must not cost the evaluation
    print(f"accuracy={result['accuracy']:.4f} blind_accuracy={result['blind_accuracy']:.4f}")
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as exc:
            reason = "no space left on device" if exc.errno in DISK_FULL else (exc.strerror or str(exc))
            raise UserError(f"{reason} writing --output {args.output!r}; the result is printed above: free space or "
                            "choose another --output") from None
    return 0
