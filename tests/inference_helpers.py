"""Tiny model folders for the inference tests (vlm, LoRA run): real architectures, random weights, no Hub."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

import vlm
from vlm.folders.weights import save_model_folder
from vlm.data.tokenizer import build_tokenizer
from vlm.folders.kinds import record_template
from vlm.tiny import tiny_vlm_config
from vlm.visual.processor import ImageProcessor

CORPUS = ["What color is the circle? red green blue yellow. What shape is it? circle square triangle. "
          "How many shapes are there? 1 2 3. Is there a blue square? yes no"] * 4


def tiny_tokenizer(vocab_size: int = 400):
    return build_tokenizer(CORPUS, vocab_size=vocab_size)


def tiny_model(vision: str = "siglip", llm: str = "qwen2", *, tokenizer=None, seed: int = 0, tied: bool = False,
               **kwargs):
    """(model, tokenizer, image processor); the LLM vocabulary fits the tokenizer."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_vlm_config(vision, llm, vocab_size=len(tokenizer), **kwargs)
    # Untied: a random model with tied embeddings only repeats its last input token.
    config.llm.hf_config["tie_word_embeddings"] = tied
    model = vlm.build_model(config, tokenizer=tokenizer).eval()
    processor = ImageProcessor.from_vision_config(model.vlm_config.vision.hf_config, aspect_ratio="pad")
    return model, tokenizer, processor


def save_tiny_folder(folder: Path, vision: str = "siglip", llm: str = "qwen2", *, template: str = "chatml",
                     seed: int = 0, **kwargs) -> Path:
    model, tokenizer, processor = tiny_model(vision, llm, seed=seed, **kwargs)
    save_model_folder(folder, model, tokenizer=tokenizer, image_processor=processor)
    record_template(folder, template)
    return folder


def forget_template(folder: Path) -> None:
    """Make `folder` a model folder that records no chat template (as one saved outside training)."""
    from vlm.config import VLMConfig

    VLMConfig.load(folder).replace(template=None).save(folder)
    (Path(folder) / "vlm_generation.json").unlink(missing_ok=True)


def write_image(path: Path, color=(220, 40, 40), size=(40, 32)) -> Path:
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste(color, (5, 5, 25, 25))
    image.save(path)
    return path


def command(name: str):
    """`vlm <name>` as a function of argv: the subcommand's main run under `vlm.cli.run` (one line and exit 2 for a
    user mistake), as the console command runs it."""
    import vlm.cli

    return lambda argv: vlm.cli.main([name, *argv])
