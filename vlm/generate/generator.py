"""Generation: prompts from messages and images, greedy or sampled decoding with the KV cache, streaming, batches.

Design choices:
- Prompts are built by `vlm.data.conversation.encode_prompt`, the same code that tokenises training
  samples, so the model continues from exactly the tokens it was trained after (each `<image>` becomes
  `num_image_tokens` image-token ids). One image and no `<image>` in the text: it is prepended, as in
  training.
- Decoding is `transformers`' `generate` with a fresh `GenerationConfig` (the LLM's own generation
  defaults, e.g. a checkpoint's `do_sample=True`, never leak in): temperature 0 is greedy; generation
  stops at the template's end-of-turn token or eos. Images are encoded once, at prefill.
- Batches are left-padded (the last prompt token of every row sits at the same position, so one
  `generate` call decodes all rows); rows are sorted by length to waste little padding and answers are
  returned in input order. Greedy batched answers equal one-at-a-time answers (tests).
- The chat template is a property of how a model was trained, not of its name: `default_template` reads
  it from the folder (`vlm_generation.json`, written by training), uses `vicuna_v1` for original LLaVA-1.5
  folders and the tokenizer's own chat template for others. `--conv-mode` overrides it, but one that
  prompts differently from the recorded template is an error unless `--force-template` (`check_template`).
- A prompt that does not fit the context is an error naming both lengths; `max_new_tokens` is capped so
  prompt + answer fit.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import IO, Any, Sequence

import torch
from transformers import GenerationConfig, TextStreamer

GENERATION_FILE = "vlm_generation.json"


# ---------------------------------------------------------------------------------------------------------
# Templates


def save_generation_defaults(folder: str | os.PathLike, *, template: str) -> None:
    """Record the chat template a model was trained with (training calls this when saving)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, GENERATION_FILE), "w", encoding="utf-8") as f:
        json.dump({"template": template}, f, indent=2)
        f.write("\n")


def read_template(folder: str | os.PathLike) -> str | None:
    path = os.path.join(folder, GENERATION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("template")


def recorded_template(folder: str | os.PathLike) -> str | None:
    """The template a model folder (or LoRA run, or a Hub id's cached snapshot) records it was trained with."""
    from vlm.folders.load import model_kind

    return read_template(model_kind(str(folder))[1])


def default_template(folder: str | os.PathLike, tokenizer) -> str:
    """The chat template to prompt a model folder with when the user names none (see the module docstring)."""
    from vlm.folders.load import model_kind

    kind, local = model_kind(str(folder))  # a Hub id: its cached snapshot
    recorded = read_template(local)
    if recorded:
        return recorded
    if kind == "llava":
        return "vicuna_v1"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    raise ValueError(
        f"model folder {str(folder)!r} records no chat template and its tokenizer has none; pass --conv-mode "
        "(plain, vicuna_v1, chatml, llama3)"
    )


def _same_format(a: str, b: str, tokenizer) -> bool:
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
    """`given` against the template the model folder records: ValueError when they prompt differently, unless
    `force` (then a warning on stderr). A folder that records none is not checked.

    An error rather than a warning because the failure is silent otherwise: a model prompted in a format
    it was not trained on answers fluent-looking garbage (a chatml model under vicuna_v1 wrote 256 tokens
    of it; `vlm eval` reported 6% accuracy), and a warning scrolls away above the answers or the
    progress bar. `--force-template` keeps deliberate experiments possible."""
    from vlm.data.templates import get_template

    get_template(given)  # an unknown name is that error, not a mismatch
    recorded = recorded_template(folder)
    if recorded is None or _same_format(given, recorded, tokenizer):
        return
    message = (f"model {str(folder)!r} was trained with chat template {recorded!r} (its {GENERATION_FILE}), but "
               f"{flag} {given!r} was given; a model prompted in another format answers garbage")
    if not force:
        raise ValueError(f"{message}: drop {flag} to use {recorded!r}, or add --force-template to use {given!r} anyway")
    print(f"warning: {message}; using {given!r} as --force-template asks", file=sys.stderr, flush=True)


def stop_token_ids(tokenizer, template) -> list[int]:
    """Ids that end an answer: the template's end-of-turn token and eos."""
    from vlm.data.templates import get_template
    from vlm.data.tokenizer import token_id

    bound = get_template(template, tokenizer) if isinstance(template, str) else template.bind(tokenizer)
    ids = [token_id(tokenizer, bound.end_of_turn_token(tokenizer)), tokenizer.eos_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None]


# ---------------------------------------------------------------------------------------------------------
# Prompts and images


@dataclass
class GenerationSettings:
    """Decoding options: temperature 0 is greedy; top_p applies when sampling."""

    temperature: float = 0.0
    top_p: float | None = None
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # also nan, which compares false both ways
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 = greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


def build_prompt(messages: list[dict], tokenizer, template, *, num_image_tokens: int, num_images: int) -> list[int]:
    """Token ids of the conversation so far (ending with a user turn) plus the assistant header.

    Basic-VLM's `<|extra_0|>` in a user message marks the image, as in its training data (`<image>`).
    """
    from vlm.data.conversation import encode_prompt
    from vlm.data.formats.basic_vlm import mark_image

    messages = [{**m, "content": mark_image(m["content"])} if m["role"] == "user" and isinstance(m["content"], str)
                else m for m in messages]
    return encode_prompt(messages, tokenizer, template, num_image_tokens=num_image_tokens, num_images=num_images)


def check_prompt_length(prompt_len: int, context_len: int, *, num_image_tokens: int = 0, where: str = "the prompt") -> None:
    if prompt_len >= context_len:
        raise ValueError(
            f"{where} is {prompt_len} tokens ({num_image_tokens} of them image tokens), which leaves no room to "
            f"answer in the model's context of {context_len} tokens; shorten the question or the conversation "
            "(/reset in chat)"
        )


ACCEPTED_IMAGES = ("a file path, the file's bytes, a PIL.Image, or a uint8 numpy array / torch tensor shaped (H, W, 3), "
                   "(3, H, W) or (H, W)")


def as_image(source: Any, index: int = 0) -> Any:
    """One image as the image processor takes it: a PIL image or a uint8 array / tensor as given, a file (path,
    bytes, binary file object) decoded now so a bad one is named at once; TypeError naming what is accepted."""
    import numpy as np
    from PIL import Image

    from vlm.visual.processor import load_image

    if isinstance(source, (Image.Image, np.ndarray, torch.Tensor)):
        return source  # the processor checks dtype and layout and says what to convert
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(source, "read"):
        return load_image(source)
    raise TypeError(f"image {index} is a {type(source).__name__}; expected {ACCEPTED_IMAGES}")


def load_pixels(images: Sequence[Any], image_processor) -> torch.Tensor | None:
    """Images (each as `as_image` takes it) -> (N, 3, H, W), or None for no images. Errors name the file."""
    if not images:
        return None
    return image_processor([as_image(image, i) for i, image in enumerate(images)], return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------------------------------------------------
# Decoding


class StreamToFile(TextStreamer):
    """Writes the decoded answer to `file` as tokens arrive (batch size 1), then a newline."""

    def __init__(self, tokenizer, file: IO[str] | None = None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.file = file if file is not None else sys.stdout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.file.write(text + ("\n" if stream_end else ""))
        self.file.flush()


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids left-padded with `pad_token_id` and the (B, T) attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return candidate
    return 0


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor | None, *, stop_ids: list[int],
                 pad_token_id: int, settings: GenerationSettings, context_len: int | None = None,
                 streamer=None, use_cache: bool = True) -> list[list[int]]:
    """Generate for a left-padded batch; returns each row's new ids, cut before the first stop id.

    `pixel_values` (N, 3, H, W) holds the images of all prompts in order (the image runs in the ids).
    """
    ids, mask = left_pad(prompts, pad_token_id)
    max_new = settings.max_new_tokens
    if context_len is not None:
        max_new = max(1, min(max_new, context_len - ids.shape[1]))
    sampling = settings.temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new, do_sample=sampling, eos_token_id=list(stop_ids) or None, pad_token_id=pad_token_id,
        use_cache=use_cache, **({"temperature": settings.temperature, "top_p": settings.top_p or 1.0} if sampling else {}),
    )
    device = model.get_input_embeddings().weight.device
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixel_values,
                         generation_config=config, streamer=streamer)
    answers = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        answers.append(row[:cut])
    return answers


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class Generator:
    """A loaded model with what it needs to answer: tokenizer, image processor, template, context length."""

    model: Any
    tokenizer: Any
    image_processor: Any
    template: str
    context_len: int
    settings: GenerationSettings

    @property
    def num_image_tokens(self) -> int:
        return self.model.vlm_config.num_image_tokens

    def prompt(self, messages: list[dict], num_images: int) -> list[int]:
        ids = build_prompt(messages, self.tokenizer, self.template, num_image_tokens=self.num_image_tokens,
                           num_images=num_images)
        check_prompt_length(len(ids), self.context_len, num_image_tokens=num_images * self.num_image_tokens)
        return ids

    def reply(self, messages: list[dict], images: Sequence[Any] = (), *, stream: IO[str] | None = None) -> str:
        """The assistant's answer to `messages` (ending with a user turn) about `images`: each a path, bytes, a
        PIL image or a uint8 numpy array / torch tensor (H, W, 3), (3, H, W) or (H, W)."""
        ids = self.prompt(messages, len(images))
        streamer = StreamToFile(self.tokenizer, stream) if stream is not None else None
        out = generate_ids(self.model, [ids], load_pixels(images, self.image_processor),
                           stop_ids=stop_token_ids(self.tokenizer, self.template), pad_token_id=pad_id(self.tokenizer),
                           settings=self.settings, context_len=self.context_len, streamer=streamer)
        return decode(self.tokenizer, out[0])

    def answer(self, question: str, image: Any = None, *, stream: IO[str] | None = None) -> str:
        """One question about one image (or None); the image as `reply` takes it."""
        return self.reply([{"role": "user", "content": question}], [image] if image is not None else [], stream=stream)

    def answer_batch(self, questions: Sequence[str], images: Sequence[Any], *, batch_size: int = 8,
                     progress: bool = False) -> list[str]:
        """Answers to `questions[i]` about `images[i]` (None for no image), decoded in left-padded batches."""
        from tqdm import tqdm

        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images; pass one image (or None) per question")
        prompts = [self.prompt([{"role": "user", "content": q}], int(image is not None))
                   for q, image in zip(questions, images)]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        stops, pad = stop_token_ids(self.tokenizer, self.template), pad_id(self.tokenizer)
        bar = tqdm(total=len(prompts), disable=not progress, desc="generating", unit="q", file=sys.stderr)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            pixels = load_pixels([images[i] for i in rows if images[i] is not None], self.image_processor)
            out = generate_ids(self.model, [prompts[i] for i in rows], pixels, stop_ids=stops, pad_token_id=pad,
                               settings=self.settings, context_len=self.context_len)
            for i, ids in zip(rows, out):
                answers[i] = decode(self.tokenizer, ids)
            bar.update(len(rows))
        bar.close()
        return answers


def load_generator(model_path: str, *, model_base: str | None = None, conv_mode: str | None = None,
                   settings: GenerationSettings | None = None, device: str = "cpu", dtype=None,
                   load_8bit: bool = False, load_4bit: bool = False, force_template: bool = False,
                   trust_remote_code: bool = False, force_base: bool = False) -> Generator:
    """`load_pretrained_model` plus the chat template (`conv_mode`, else `default_template`). A `conv_mode`
    that prompts differently from the template the folder records is a ValueError unless `force_template`
    (`check_template`); `trust_remote_code` and `force_base` are `load_pretrained_model`'s."""
    from vlm.folders.load import load_pretrained_model, resolve_model_path

    folder = resolve_model_path(model_path)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        folder, model_base, load_8bit=load_8bit, load_4bit=load_4bit, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code, force_base=force_base)
    if conv_mode:
        check_template(folder, conv_mode, tokenizer, force=force_template)
    template = conv_mode or default_template(folder, tokenizer)
    stop_token_ids(tokenizer, template)  # validates the template against the tokenizer now, not mid-answer
    return Generator(model, tokenizer, image_processor, template, context_len, settings or GenerationSettings())


# ---------------------------------------------------------------------------------------------------------
# Command-line flags shared by test.py, `vlm chat` and `vlm generate` (LLaVA's and Basic-VLM's spellings too)


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


def add_decoding_arguments(parser, *, max_new_tokens: int = 256) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    group.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None, help="nucleus sampling threshold")
    group.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=max_new_tokens,
                       help=f"longest answer in tokens (default {max_new_tokens})")
    group.add_argument("--seed", type=int, default=None, help="random seed for sampling")


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
        raise ValueError(f"{flag} {name!r} is not a device; use cpu, cuda, cuda:1, mps ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name!r} but this machine has no CUDA GPU (or torch was built without CUDA); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name!r} but MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps") and not hasattr(torch, device.type):
        raise ValueError(f"{flag} {name!r}: this torch has no {device.type!r} backend; use --device cpu")
    return name


def _basic_vlm_base(model: str, model_base: str | None, language_model: str) -> str | None:
    """`--base_language_model` is the base of a LoRA run; for a full model folder it is not a base (None)."""
    from vlm.folders.load import folder_kind, resolve_model_path

    if model_base is not None and model_base != language_model:
        raise ValueError(f"--model-base {model_base!r} and --base_language_model {language_model!r} disagree; "
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
        raise ValueError(f"--base_language_model {language_model!r} is not the LLM of the model folder "
                         f"({'; '.join(differ)}); pass the LLM the model was trained from, or drop the flag")


USER_ERRORS = (FileNotFoundError, ValueError, ImportError)
