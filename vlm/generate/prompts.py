"""Which chat template to prompt a model with, and whether a prompt fits: the checks made before decoding.

The ids themselves are built one layer down, by `vlm.processing.build_prompt` (the processor needs them too),
from the same code that tokenises training samples.

Design choices:
- The template a folder records wins (`vlm.folders.kinds.default_template`). A template named by the user
  (`--conv-mode`, `--template`) that prompts differently from the recorded one is an error unless
  `--force-template` (`check_template`): the failure is silent otherwise.
- A prompt that does not fit the context is an error naming both lengths (`check_prompt_length`);
  decoding caps `max_new_tokens` so prompt + answer fit.
"""

from __future__ import annotations

import os
import sys

from vlm.errors import ConfigError, UserError
from vlm.folders.kinds import default_template, folder_template
from vlm.processing import build_prompt


def same_format(a: str, b: str, tokenizer) -> bool:
    """Whether two template names prompt this tokenizer identically (aliases, or e.g. chatml and a Qwen
    tokenizer's own template): a probe conversation with one image encodes to the same ids."""
    from vlm.data.templates import ALIASES

    if ALIASES.get(a, a) == ALIASES.get(b, b):
        return True
    if tokenizer is None:
        return False
    probe = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
    try:
        return (build_prompt(probe, tokenizer, a, num_image_tokens=2, num_images=1)
                == build_prompt(probe, tokenizer, b, num_image_tokens=2, num_images=1))
    except ValueError:  # one of them cannot render for this tokenizer: not the same format
        return False


def check_template(folder: str | os.PathLike, given: str, tokenizer=None, *, force: bool = False,
                   flag: str = "--conv-mode") -> None:
    """`given` against the template the model folder records: ConfigError when they prompt differently, unless
    `force` (then a warning on stderr). A folder that records none is not checked.

    An error rather than a warning because the failure is silent otherwise: a model prompted in a format
    it was not trained on answers fluent-looking garbage (a chatml model under vicuna_v1 wrote 256 tokens
    of it; `vlm eval` reported 6% accuracy), and a warning scrolls away above the answers or the
    progress bar. `--force-template` keeps deliberate experiments possible."""
    from vlm.data.templates import get_template

    get_template(given)  # an unknown name is that error, not a mismatch
    recorded = folder_template(folder)
    if recorded is None or same_format(given, recorded, tokenizer):
        return
    message = (f"model {str(folder)!r} was trained with chat template {recorded!r} (recorded in the folder), but "
               f"{flag} {given!r} was given; a model prompted in another format answers garbage")
    if not force:
        raise ConfigError(f"{message}: drop {flag} to use {recorded!r}, or add --force-template to use {given!r} anyway")
    print(f"warning: {message}; using {given!r} as --force-template asks", file=sys.stderr, flush=True)


def choose_template(folder: str | os.PathLike, given: str | None, tokenizer, *, force: bool = False,
                    flag: str = "--conv-mode") -> str:
    """The template to prompt `folder`'s model with: `given` (checked by `check_template`) or the folder's own."""
    if given is None:
        return default_template(folder, tokenizer)
    check_template(folder, given, tokenizer, force=force, flag=flag)
    return given


def check_prompt_length(prompt_len: int, context_len: int, *, num_image_tokens: int = 0,
                        where: str = "the prompt") -> None:
    """UserError when a prompt of `prompt_len` tokens leaves no room for an answer in `context_len`."""
    if prompt_len >= context_len:
        raise UserError(
            f"{where} is {prompt_len} tokens ({num_image_tokens} of them image tokens), which leaves no room to "
            f"answer in the model's context of {context_len} tokens; shorten the question or the conversation "
            "(/reset in chat)"
        )
