"""A loaded model that answers: `Generator`, `load_generator`, and the two-line Python API.

    model, processor = vlm.load("runs/demo/model")
    print(vlm.answer(model, processor, "photo.jpg", "What is in the picture?"))

    generator = load_generator("runs/demo/model")
    generator.answer("What color is the circle?", "photo.jpg")
    generator.answer_batch(questions, images, batch_size=16)

Design choices:
- A `Generator` holds what answering needs (model, tokenizer, image processor, template, context length,
  decoding settings) and builds the prompts (`vlm.processing.build_prompt`, checked by
  `vlm.generate.prompts.check_prompt_length`); every method decodes through the one loop,
  `vlm.generate.decoding.decode_prompts`.
- One image and no `<image>` in the text: it is prepended, as in training.
- The template: the one named (`conv_mode`, checked against the folder's record) or the folder's own
  (`vlm.generate.prompts.choose_template`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO, Any, Sequence

import torch

from vlm.errors import UserError
from vlm.generate.decoding import GenerationSettings, decode_prompts
from vlm.generate.prompts import check_prompt_length, choose_template
from vlm.processing import Conversation, VLMProcessor, build_prompt, pad_id, stop_token_ids


@dataclass
class Generator:
    """A loaded model with what it needs to answer: tokenizer, image processor, template, context length."""

    model: Any
    tokenizer: Any
    image_processor: Any
    template: str
    context_len: int
    settings: GenerationSettings
    # True: special-token strings in the messages are plain text (a server's clients must not forge turns)
    escape_special_tokens: bool = False

    @property
    def num_image_tokens(self) -> int:
        return self.model.vlm_config.num_image_tokens

    def prompt(self, messages: list[dict], num_images: int) -> list[int]:
        ids = build_prompt(messages, self.tokenizer, self.template, num_image_tokens=self.num_image_tokens,
                           num_images=num_images, escape_special_tokens=self.escape_special_tokens)
        check_prompt_length(len(ids), self.context_len, num_image_tokens=num_images * self.num_image_tokens)
        return ids

    def reply_many(self, conversations: Sequence[list[dict]], images: Sequence[Sequence[Any]], *, batch_size: int = 8,
                   progress: bool = False, stream: IO[str] | None = None) -> list[str]:
        """The assistant's answers to `conversations[i]` (each ending with a user turn) about `images[i]` (a list
        of images, each a path, bytes, a PIL image or a uint8 numpy array / torch tensor (H, W, 3), (3, H, W) or
        (H, W)), decoded in left-padded batches of `batch_size`."""
        prompts = [self.prompt(list(messages), len(row)) for messages, row in zip(conversations, images)]
        return decode_prompts(self.model, self.tokenizer, self.image_processor, prompts, images,
                              stop_ids=stop_token_ids(self.tokenizer, self.template),
                              pad_token_id=pad_id(self.tokenizer), settings=self.settings,
                              context_len=self.context_len, batch_size=batch_size, progress=progress, stream=stream)

    def reply(self, messages: list[dict], images: Sequence[Any] = (), *, stream: IO[str] | None = None) -> str:
        """The assistant's answer to `messages` (ending with a user turn) about `images` (as `reply_many`)."""
        return self.reply_many([messages], [list(images)], batch_size=1, stream=stream)[0]

    def answer(self, question: str, image: Any = None, *, stream: IO[str] | None = None) -> str:
        """One question about one image (or None); the image as `reply` takes it."""
        return self.reply([{"role": "user", "content": question}], [image] if image is not None else [], stream=stream)

    def answer_batch(self, questions: Sequence[str], images: Sequence[Any], *, batch_size: int = 8,
                     progress: bool = False) -> list[str]:
        """Answers to `questions[i]` about `images[i]` (None for no image), decoded in left-padded batches."""
        if len(questions) != len(images):
            raise UserError(f"{len(questions)} questions but {len(images)} images; pass one image (or None) per question")
        return self.reply_many([[{"role": "user", "content": q}] for q in questions],
                               [[image] if image is not None else [] for image in images],
                               batch_size=batch_size, progress=progress)


def load_generator(model_path: str, *, model_base: str | None = None, conv_mode: str | None = None,
                   settings: GenerationSettings | None = None, device: str = "cpu", dtype=None,
                   load_8bit: bool = False, load_4bit: bool = False, force_template: bool = False,
                   trust_remote_code: bool = False, force_base: bool = False) -> Generator:
    """`load_pretrained_model` plus the chat template (`conv_mode`, else the folder's own). A `conv_mode`
    that prompts differently from the template the folder records is a ConfigError unless `force_template`
    (`check_template`); `trust_remote_code` and `force_base` are `load_pretrained_model`'s."""
    from vlm.folders.kinds import resolve_model_path
    from vlm.folders.load import load_pretrained_model

    folder = resolve_model_path(model_path)
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        folder, model_base, load_8bit=load_8bit, load_4bit=load_4bit, device=device, dtype=dtype,
        trust_remote_code=trust_remote_code, force_base=force_base)
    template = choose_template(folder, conv_mode or None, tokenizer, force=force_template)
    stop_token_ids(tokenizer, template)  # validates the template against the tokenizer now, not mid-answer
    return Generator(model, tokenizer, image_processor, template, context_len, settings or GenerationSettings())


# ---------------------------------------------------------------------------------------------------------
# Two-line inference: vlm.load, vlm.answer


def load(model_path: str | os.PathLike, *, template: str | None = None, model_base: str | None = None,
         device: str = "cpu", dtype: str | torch.dtype | None = None, load_8bit: bool = False,
         load_4bit: bool = False, trust_remote_code: bool = False,
         force_base: bool = False) -> tuple[Any, VLMProcessor]:
    """(model, VLMProcessor) of any folder `vlm.load_pretrained_model` reads: vlm model folder, vlm LoRA run
    (merged; `model_base` as `--model-base`), LLaVA-1.5, llava-hf, or a Hub id of one.

    `template` overrides the one the folder records (`--conv-mode`); the other arguments are
    `load_pretrained_model`'s (`trust_remote_code`: let a folder with `auto_map` run its code; `force_base`:
    accept a LoRA base whose weights differ from the recorded one).
    """
    generator = load_generator(str(model_path), model_base=model_base, conv_mode=template, device=device,
                               dtype=dtype, load_8bit=load_8bit, load_4bit=load_4bit,
                               trust_remote_code=trust_remote_code, force_base=force_base)
    processor = VLMProcessor(generator.tokenizer, generator.image_processor, generator.template,
                             num_image_tokens=generator.num_image_tokens)
    return generator.model, processor


def answer(model, processor: VLMProcessor, image: Any, question: str | Conversation, *, temperature: float = 0.0,
           top_p: float | None = None, max_new_tokens: int = 128, stream: IO[str] | None = None) -> str:
    """The model's answer to `question` about `image`.

    Args:
        image: a path, a PIL image (see `VLMProcessor.__call__`), a list of them, or None (text only).
        question: a question, or a conversation ending with a user turn.
        temperature: 0 is greedy; top_p applies when sampling.
        stream: a file (e.g. sys.stdout) the answer is also written to as it is generated.

    Raises:
        UserError: the processor belongs to another model (image token or image-token count differ), or the
            prompt does not fit the model's context.
    """
    from vlm.data.tokenizer import get_image_token_id
    from vlm.folders.load import context_length

    config = model.vlm_config
    if processor.num_image_tokens not in (None, config.num_image_tokens) or \
            get_image_token_id(processor.tokenizer) != config.image_token_id:
        raise UserError(
            f"the processor is not this model's: <image> id {get_image_token_id(processor.tokenizer)} and "
            f"{processor.num_image_tokens} image tokens vs the model's {config.image_token_id} and "
            f"{config.num_image_tokens}; load both from one folder (vlm.load)"
        )
    settings = GenerationSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    generator = Generator(model, processor.tokenizer, processor.image_processor, processor.template,
                          context_length(model, processor.tokenizer), settings)
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    return generator.reply(messages, images, stream=stream)
