"""Command-line flags shared by `vlm ask` / test.py, `vlm chat` and `vlm generate` (LLaVA's and Basic-VLM's
spellings too), and loading the model they name (`generator_from_args`).
"""

from __future__ import annotations

import argparse
import sys

import torch

from vlm.errors import ConfigError
from vlm.generate.decoding import GenerationSettings
from vlm.generate.generator import Generator, load_generator


def add_model_arguments(parser, *, required: bool = True) -> None:
    from vlm.hub import add_trust_remote_code_argument
    from vlm.folders.lora import add_force_base_argument

    group = parser.add_argument_group("model")
    group.add_argument("--model", "--model-path", "--model_path", "--model_weights", dest="model", required=required,
                       help="vlm model folder, vlm LoRA run, LLaVA-1.5 or llava-hf folder (or a Hub id)")
    group.add_argument("--model-base", "--model_base", dest="model_base", default=None,
                       help="base of a LoRA run (vlm folder, LLM folder or Hub id; default: the run's own record)")
    group.add_argument("--base_language_model", default=None,
                       help="Basic-VLM's LLM flag: the base of a LoRA run (as --model-base); a full model folder "
                            "carries its LLM, so there it is only checked against the folder's")
    group.add_argument("--base_value_model", default=None,
                       help="Basic-VLM's vision model flag; accepted for compatibility: vlm folders carry their tower")
    group.add_argument("--conv-mode", "--conv_mode", dest="conv_mode", default=None,
                       help="chat template: plain, vicuna_v1, chatml, llama3, tokenizer (default: the one the model "
                            "was trained with; another one is an error unless --force-template)")
    group.add_argument("--force-template", "--force_template", dest="force_template", action="store_true",
                       help="use --conv-mode even when the model folder records another template")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    group.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weights dtype (default: the folder's)")
    group.add_argument("--load-8bit", "--load_8bit", dest="load_8bit", action="store_true",
                       help="load the LLM in 8 bits with bitsandbytes, CUDA or CPU (pip install 'vlm-kit[qlora]')")
    group.add_argument("--load-4bit", "--load_4bit", dest="load_4bit", action="store_true",
                       help="load the LLM in 4 bits (nf4) with bitsandbytes, CUDA or CPU (pip install 'vlm-kit[qlora]')")
    add_trust_remote_code_argument(group)
    add_force_base_argument(group)


def true_or_false(value: str) -> bool:
    """A boolean flag value as users type it (`True`, `false`, `1`, `no`); argparse's `type=bool` takes any
    non-empty string, "False" included, as true."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_decoding_arguments(parser, *, max_new_tokens: int = 256, escape_special_tokens: bool = False) -> None:
    """Decoding flags, and how the prompt's text is tokenised. `escape_special_tokens`: the command's default
    (False, as training's, for a user's own questions; True for `vlm serve`, whose clients must not forge turns)."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    group.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None, help="nucleus sampling threshold")
    group.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=max_new_tokens,
                       help=f"longest answer in tokens (default {max_new_tokens})")
    group.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    # bare `--escape_special_tokens` is True and `--escape_special_tokens False` works, as in training's flags
    group.add_argument("--escape_special_tokens", "--escape-special-tokens", dest="escape_special_tokens",
                       type=true_or_false, nargs="?", const=True, default=escape_special_tokens,
                       metavar="{True,False}",
                       help="tokenise special-token strings in the messages (<|im_end|>, </s>) as plain text, so text "
                            "cannot end a turn or start another role's; match training's --escape_special_tokens "
                            f"(default {escape_special_tokens})")


def generator_from_args(args) -> Generator:
    """Load the model the parsed flags name; the seed is set here (in main, never at import)."""
    if args.seed is not None:
        torch.manual_seed(args.seed)
    device = check_device(args.device) if args.device else ("cuda" if torch.cuda.is_available() else "cpu")
    settings = GenerationSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    model_base, language_model = args.model_base, getattr(args, "base_language_model", None)
    if language_model is not None:
        model_base = _basic_vlm_base(args.model, model_base, language_model)
    generator = load_generator(args.model, model_base=model_base, conv_mode=args.conv_mode, settings=settings,
                               device=device, dtype=args.dtype, load_8bit=args.load_8bit, load_4bit=args.load_4bit,
                               force_template=args.force_template, trust_remote_code=args.trust_remote_code,
                               force_base=args.force_base)
    generator.escape_special_tokens = args.escape_special_tokens
    if language_model is not None and model_base is None:
        _check_language_model(generator.model, language_model)
    tower = generator.model.vlm_config.vision.name_or_path
    if args.base_value_model and args.base_value_model != tower:
        print(f"note: --base_value_model {args.base_value_model!r} is not used; the model carries its own vision "
              f"tower ({tower or 'saved weights'})", file=sys.stderr)
    return generator


def check_device(name: str, flag: str = "--device") -> str:
    """`name` when this machine has that device; ValueError naming the flag otherwise (before the model loads)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {name!r} is not a device; use cpu, cuda, cuda:1, mps ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {name!r} but this machine has no CUDA GPU (or torch was built without CUDA); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {name!r} but MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps") and not hasattr(torch, device.type):
        raise ConfigError(f"{flag} {name!r}: this torch has no {device.type!r} backend; use --device cpu")
    return name


def _basic_vlm_base(model: str, model_base: str | None, language_model: str) -> str | None:
    """`--base_language_model` is the base of a LoRA run; for a full model folder it is not a base (None)."""
    from vlm.folders.kinds import folder_kind, resolve_model_path

    if model_base is not None and model_base != language_model:
        raise ConfigError(f"--model-base {model_base!r} and --base_language_model {language_model!r} disagree; "
                         "pass one of them")
    return language_model if folder_kind(resolve_model_path(model)) == "lora" else None


def _check_language_model(model, language_model: str) -> None:
    """A full folder's LLM against Basic-VLM's `--base_language_model`: an error when they differ in shape."""
    from transformers import AutoConfig

    from vlm.folders.lora import BASE_FIELDS

    try:
        other = AutoConfig.from_pretrained(language_model, trust_remote_code=False).get_text_config().to_dict()
    except (OSError, ValueError):
        print(f"note: --base_language_model {language_model!r} cannot be read here; the model folder carries its own "
              "LLM, which is used", file=sys.stderr)
        return
    ours = model.vlm_config.llm.hf_config
    differ = [f"{key} {ours[key]!r} vs {other[key]!r}" for key in BASE_FIELDS
              if key in ours and key in other and ours[key] != other[key]]
    if differ:
        raise ConfigError(f"--base_language_model {language_model!r} is not the LLM of the model folder "
                         f"({'; '.join(differ)}); pass the LLM the model was trained from, or drop the flag")

