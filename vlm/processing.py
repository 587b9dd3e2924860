"""The processor (tokenizer + image processor + chat template): questions and images -> model inputs.

    processor = vlm.VLMProcessor.from_pretrained("runs/demo/model")
    inputs = processor("What is in the picture?", "photo.jpg")     # input_ids, attention_mask, pixel_values
    model = vlm.build_model(config, tokenizer=tok)                  # a new model ...
    processor = vlm.VLMProcessor.for_model(model, tok)              # ... and what prompts it
    model.save_pretrained("out"); processor.save_pretrained("out")  # a folder every loader accepts

Answering is one layer up: `vlm.load` / `vlm.answer` (`vlm.generate.generator`).

Design choices:
- As transformers' processors (`LlavaProcessor`): one object turns a question and images into model inputs
  (`input_ids`, `attention_mask`, `pixel_values`) and is saved beside the model. It writes no file of its own:
  the tokenizer's files, `preprocessor_config.json` (`vlm.visual.processor.ImageProcessor`) and the chat
  template's name, recorded in the folder as training records it and every loader reads it
  (`vlm.folders.kinds.record_template` / `default_template`).
- `num_image_tokens` (how many ids each `<image>` becomes) belongs to the model and lives in its
  `config.json`; `from_pretrained` reads it there rather than storing a second copy.
- The functions that make inputs live here, below generation (layer 2), so the processor and the decode loop
  (`vlm.generate.decoding`) share them: prompts by `build_prompt`, i.e. `vlm.data.conversation.encode_prompt`,
  the code that tokenises training samples (the model continues from exactly the tokens it was trained after);
  batches left-padded (`left_pad`); images decoded by `as_image` / `load_pixels`; the ids that end an answer
  (`stop_token_ids`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch

from vlm.errors import ConfigError, MissingPathError, UserError
from vlm.folders.kinds import default_template, record_template
from vlm.visual.processor import ImageProcessor

if TYPE_CHECKING:
    from transformers import BatchFeature

Conversation = list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...], ending with a user turn

# ---------------------------------------------------------------------------------------------------------
# Prompts and images


def build_prompt(messages: list[dict], tokenizer, template, *, num_image_tokens: int, num_images: int,
                 escape_special_tokens: bool = False) -> list[int]:
    """Token ids of the conversation so far (ending with a user turn) plus the assistant header.

    `escape_special_tokens`: special-token strings typed in the messages (`<|im_end|>`, `</s>`) are tokenised as
    their characters, so text from someone else (a server's clients) cannot close a turn or open a new one; the
    template's own markers and `<image>` stay control tokens (`vlm.data.conversation.encode_prompt`).

    Basic-VLM's `<|extra_0|>` in a user message marks the image, as in its training data (`<image>`). A
    conversation that cannot be prompted (placeholders and images disagree, roles out of order) is a UserError
    here: a question the user typed, not a training sample to count and drop.
    """
    from vlm.data.conversation import encode_prompt
    from vlm.data.errors import SampleError
    from vlm.data.formats.basic_vlm import mark_image

    messages = [{**m, "content": mark_image(m["content"])} if m["role"] == "user" and isinstance(m["content"], str)
                else m for m in messages]
    try:
        return encode_prompt(messages, tokenizer, template, num_image_tokens=num_image_tokens, num_images=num_images,
                             escape_special_tokens=escape_special_tokens)
    except SampleError as exc:
        raise UserError(f"the prompt cannot be built: {exc.detail}") from None


def stop_token_ids(tokenizer, template) -> list[int]:
    """Ids that end an answer: the template's end-of-turn token and eos."""
    from vlm.data.templates import get_template
    from vlm.data.tokenizer import token_id

    bound = get_template(template, tokenizer) if isinstance(template, str) else template.bind(tokenizer)
    ids = [token_id(tokenizer, bound.end_of_turn_token(tokenizer)), tokenizer.eos_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None]


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
    """The id batches are padded with: pad, else eos, else unk, else 0 (padding is masked out)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return candidate
    return 0


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
# The processor


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
        if not isinstance(self.image_processor, ImageProcessor):
            raise TypeError(f"image_processor must be a vlm.visual.processor.ImageProcessor, got "
                            f"{type(self.image_processor).__name__}")
        if self.num_image_tokens is not None and (not isinstance(self.num_image_tokens, int) or self.num_image_tokens < 1):
            raise ConfigError(f"num_image_tokens={self.num_image_tokens!r} must be a positive int")
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
        from vlm.folders.kinds import load_tokenizer, model_kind
        from vlm.config import VLMConfig
        from vlm.visual.processor import PREPROCESSOR_CONFIG_NAME

        kind, local = model_kind(str(folder))
        if not os.path.isfile(os.path.join(local, PREPROCESSOR_CONFIG_NAME)):
            raise MissingPathError(
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
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        self.image_processor.save_pretrained(folder)
        record_template(folder, self.template)

    # -- inputs ----------------------------------------------------------------------------------------

    def __call__(self, text: str | Conversation | Sequence[str | Conversation], images: Any = None, *,
                 return_tensors: str = "pt") -> BatchFeature:
        """Generation inputs for one prompt or a batch, as a transformers `BatchFeature`.

        Args:
            text: a question (one user turn), a conversation (message dicts ending with a user turn), or a
                list of either (a batch). `<image>` marks where an image goes; one image and no `<image>`:
                it goes before the first user text, as in training.
            images: for one prompt: None, an image (path, PIL image, or what `load_pixels` takes)
                or a list of them; for a batch: None or one such entry per prompt.
            return_tensors: "pt" (the only kind: the inputs are for a torch model).

        Returns:
            input_ids (B, T) and attention_mask (B, T), left-padded; pixel_values (N, 3, H, W) of all images in
            prompt order, when there are any. `model.generate(**inputs)` continues from them.
        """
        from transformers import BatchFeature

        if return_tensors != "pt":
            raise UserError(f"return_tensors={return_tensors!r}: VLMProcessor returns torch tensors only ('pt')")
        prompts, per_prompt = _batch(text, images)
        rows = []
        for conversation, row_images in zip(prompts, per_prompt):
            if row_images and self.num_image_tokens is None:
                raise UserError("this processor does not know the model's num_image_tokens; load it from a model "
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
        raise UserError(f"a batch of {len(prompts)} prompts needs images=None or a list of {len(prompts)} entries "
                         f"(None, an image or a list of images per prompt), got {count}")
    return prompts, [_as_image_list(entry) for entry in images]
