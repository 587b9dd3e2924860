"""The processor (tokenizer + image processor + chat template) and two-line inference from Python.

    model, processor = vlm.load("runs/demo/model")
    print(vlm.answer(model, processor, "photo.jpg", "What is in the picture?"))

    model = vlm.build_model(config, tokenizer=tok)                  # a new model ...
    processor = vlm.VLMProcessor.for_model(model, tok)              # ... and what prompts it
    model.save_pretrained("out"); processor.save_pretrained("out")  # a folder every loader accepts

Design choices:
- As transformers' processors (`LlavaProcessor`): one object turns a question and images into model inputs
  (`input_ids`, `attention_mask`, `pixel_values`) and is saved beside the model. It writes no file of its own:
  the tokenizer's files, `preprocessor_config.json` (`vlm.visual.processor.ImageProcessor`) and the chat
  template's name in `vlm_generation.json` -- the record training writes and every loader reads
  (`vlm.generate.generator.save_generation_defaults` / `default_template`).
- `num_image_tokens` (how many ids each `<image>` becomes) belongs to the model and lives in its
  `config.json`; `from_pretrained` reads it there rather than storing a second copy.
- Prompts are built by `vlm.generate.generator.build_prompt`, i.e. `vlm.data.conversation.encode_prompt`, the code that
  tokenises training samples; batches are left-padded as `vlm.generate.generator` decodes them.
- `answer` wraps the model and processor in a `vlm.generate.generator.Generator` and asks it: one decode loop for
  Python, `test.py`, `vlm chat` and `vlm generate`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any, Sequence

import torch

from vlm.visual.processor import ImageProcessor

if TYPE_CHECKING:
    from transformers import BatchFeature

Conversation = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...], ending with a user turn


@dataclass
class VLMProcessor:
    """What turns a question and images into inputs of one model.

    Attributes:
        tokenizer: the model's tokenizer (with `<image>`).
        image_processor: images -> pixel_values (N, 3, H, W).
        template: chat template name (`chatml`, `vicuna_v1`, `plain`, `llama3`, `tokenizer`, ...).
        num_image_tokens: ids per `<image>` (the model's `vlm_config.num_image_tokens`); None only for a
            processor that is never given images.
    """

    tokenizer: Any
    image_processor: ImageProcessor
    template: str
    num_image_tokens: int | None = None

    def __post_init__(self) -> None:
        from vlm.generate.generator import stop_token_ids

        if not isinstance(self.image_processor, ImageProcessor):
            raise TypeError(f"image_processor must be a vlm.visual.processor.ImageProcessor, got "
                            f"{type(self.image_processor).__name__}")
        if self.num_image_tokens is not None and (not isinstance(self.num_image_tokens, int) or self.num_image_tokens < 1):
            raise ValueError(f"num_image_tokens={self.num_image_tokens!r} must be a positive int")
        stop_token_ids(self.tokenizer, self.template)  # an unknown template, or one the tokenizer cannot end: now

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model, tokenizer, *, image_processor: ImageProcessor | None = None,
                  template: str | None = None) -> VLMProcessor:
        """The processor of a model built in this process (`vlm.build_model(config, tokenizer=tokenizer)`).

        Args:
            image_processor: default: the vision tower's own (`preprocessor_config.json` of
                `vision.name_or_path`) when the model was built from one, else the tower type's defaults;
                with LLaVA's `pad` aspect ratio either way, as training defaults to.
            template: default: what training picks for an instruct LLM (`default_template_name`): the
                tokenizer's own chat template when it has one, else `vicuna_v1`.
        """
        from vlm.data.templates import default_template_name

        config = model.vlm_config
        if image_processor is None:
            tower = config.vision.name_or_path
            if tower:  # as training reads it (vlm.train.model_setup)
                image_processor = ImageProcessor(replace(ImageProcessor.from_pretrained(tower).config, aspect_ratio="pad"))
            else:
                image_processor = ImageProcessor.from_vision_config(config.vision.hf_config, aspect_ratio="pad")
        return cls(tokenizer, image_processor, template or default_template_name(tokenizer),
                   num_image_tokens=config.num_image_tokens)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, template: str | None = None,
                        num_image_tokens: int | None = None, trust_remote_code: bool = False) -> VLMProcessor:
        """Read the processor saved in a model folder (or a Hub id of one).

        Args:
            template: overrides the folder's recorded template (`--conv-mode`).
            num_image_tokens: default: the folder's `config.json` (a vlm model folder).
            trust_remote_code: allow a tokenizer whose files declare `auto_map` (refused otherwise).
        """
        from vlm.folders.load import load_tokenizer, model_kind
        from vlm.config import VLMConfig
        from vlm.generate.generator import default_template
        from vlm.visual.processor import PREPROCESSOR_CONFIG_NAME

        kind, local = model_kind(str(folder))
        if not os.path.isfile(os.path.join(local, PREPROCESSOR_CONFIG_NAME)):
            raise FileNotFoundError(
                f"{str(folder)!r} has no {PREPROCESSOR_CONFIG_NAME}; save the processor there with "
                "VLMProcessor.save_pretrained(folder), or load any model folder with vlm.load(folder)"
            )
        tokenizer = load_tokenizer(local, trust_remote_code=trust_remote_code)
        if num_image_tokens is None and kind == "vlm":
            num_image_tokens = VLMConfig.load(local).num_image_tokens
        return cls(tokenizer, ImageProcessor.from_pretrained(local), template or default_template(local, tokenizer),
                   num_image_tokens=num_image_tokens)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer files, `preprocessor_config.json` and the template record into `folder`."""
        from vlm.generate.generator import save_generation_defaults

        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        self.image_processor.save_pretrained(folder)
        save_generation_defaults(folder, template=self.template)

    # -- inputs ----------------------------------------------------------------------------------------

    def __call__(self, text: str | Conversation | Sequence[str | Conversation], images: Any = None, *,
                 return_tensors: str = "pt") -> BatchFeature:
        """Generation inputs for one prompt or a batch, as a transformers `BatchFeature`.

        Args:
            text: a question (one user turn), a conversation (message dicts ending with a user turn), or a
                list of either (a batch). `<image>` marks where an image goes; one image and no `<image>`:
                it goes before the first user text, as in training.
            images: for one prompt: None, an image (path, PIL image, or what `vlm.generate.generator.load_pixels` takes)
                or a list of them; for a batch: None or one such entry per prompt.
            return_tensors: "pt" (the only kind: the inputs are for a torch model).

        Returns:
            input_ids (B, T) and attention_mask (B, T), left-padded; pixel_values (N, 3, H, W) of all images in
            prompt order, when there are any. `model.generate(**inputs)` continues from them.
        """
        from transformers import BatchFeature

        from vlm.generate.generator import build_prompt, left_pad, load_pixels, pad_id

        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: VLMProcessor returns torch tensors only ('pt')")
        prompts, per_prompt = _batch(text, images)
        rows = []
        for conversation, row_images in zip(prompts, per_prompt):
            if row_images and self.num_image_tokens is None:
                raise ValueError("this processor does not know the model's num_image_tokens; load it from a model "
                                 "folder or build it with VLMProcessor.for_model(model, tokenizer)")
            rows.append(build_prompt(conversation, self.tokenizer, self.template,
                                     num_image_tokens=self.num_image_tokens or 1, num_images=len(row_images)))
        input_ids, attention_mask = left_pad(rows, pad_id(self.tokenizer))  # (B, T), (B, T)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        flat = [image for row_images in per_prompt for image in row_images]
        if flat:
            data["pixel_values"] = load_pixels(flat, self.image_processor)  # (N, 3, H, W)
        return BatchFeature(data=data)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """The tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """The tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _as_conversation(value: Any, index: int | None) -> Conversation:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if _is_conversation(value):
        return value
    where = "text" if index is None else f"text[{index}]"
    raise TypeError(f"{where} is a {type(value).__name__}; expected a question (str) or a conversation (a list of "
                    "{'role': ..., 'content': ...} dicts); pass images with images=")


def _as_image_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _batch(text: Any, images: Any) -> tuple[list[Conversation], list[list]]:
    """(conversations, images of each), from one prompt or a batch."""
    if isinstance(text, str) or _is_conversation(text):
        return [_as_conversation(text, None)], [_as_image_list(images)]
    if not isinstance(text, (list, tuple)) or not text:
        empty = " (empty)" if isinstance(text, (list, tuple)) else ""
        raise TypeError(f"text is a {type(text).__name__}{empty}; expected a question, a conversation, or a non-empty "
                        "list of them; pass images with images=")
    prompts = [_as_conversation(item, i) for i, item in enumerate(text)]
    if images is None:
        return prompts, [[] for _ in prompts]
    if not isinstance(images, (list, tuple)) or len(images) != len(prompts):
        count = len(images) if isinstance(images, (list, tuple)) else "not a list"
        raise ValueError(f"a batch of {len(prompts)} prompts needs images=None or a list of {len(prompts)} entries "
                         f"(None, an image or a list of images per prompt), got {count}")
    return prompts, [_as_image_list(entry) for entry in images]


# ---------------------------------------------------------------------------------------------------------
# Two-line inference


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
    from vlm.generate.generator import load_generator

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
        ValueError: the processor belongs to another model (image token or image-token count differ), or the
            prompt does not fit the model's context.
    """
    from vlm.folders.load import context_length
    from vlm.data.tokenizer import get_image_token_id
    from vlm.generate.generator import GenerationSettings, Generator

    config = model.vlm_config
    if processor.num_image_tokens not in (None, config.num_image_tokens) or \
            get_image_token_id(processor.tokenizer) != config.image_token_id:
        raise ValueError(
            f"the processor is not this model's: <image> id {get_image_token_id(processor.tokenizer)} and "
            f"{processor.num_image_tokens} image tokens vs the model's {config.image_token_id} and "
            f"{config.num_image_tokens}; load both from one folder (vlm.load)"
        )
    settings = GenerationSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    generator = Generator(model, processor.tokenizer, processor.image_processor, processor.template,
                          context_length(model, processor.tokenizer), settings)
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    return generator.reply(messages, _as_image_list(image), stream=stream)
