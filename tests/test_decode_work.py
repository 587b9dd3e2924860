"""The decode loop does each piece of work once (issue 12, batched generation): what bench/generate_profile.py found
absent, kept absent. Counted with forward hooks on the real `generate_ids` call, not timed."""

from __future__ import annotations

import torch

from inference_helpers import tiny_model
from vlm.generate.decoding import GenerationSettings, generate_ids


def test_a_batch_encodes_its_images_once_keeps_one_logit_row_at_prefill_and_feeds_one_token_per_step():
    model, tokenizer, _ = tiny_model("siglip", "qwen2", seed=3)
    image, n = model.vlm_config.image_token_id, model.vlm_config.num_image_tokens
    text = [i for i in tokenizer("what colour is the shape on the left")["input_ids"] if i != image]
    prompts = [text[:2] + [image] * n + text[2:5], text[5:6] + [image] * n + text[6:7], text]  # left padding too
    size = model.vision_tower.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # (N, 3, H, W)
    vision, forwards = [], []
    hooks = [model.vision_tower.register_forward_hook(lambda m, args, out: vision.append(args[0].shape[0])),
             model.register_forward_hook(lambda m, args, kwargs, out: forwards.append(
                 (tuple(kwargs["input_ids"].shape), kwargs.get("pixel_values") is not None, tuple(out.logits.shape))),
                 with_kwargs=True)]
    try:
        steps = 6
        answers = generate_ids(model, prompts, pixels, stop_ids=[], pad_token_id=0,
                               settings=GenerationSettings(max_new_tokens=steps))
    finally:
        for hook in hooks:
            hook.remove()
    vocab, width = model.lm_head.out_features, max(len(p) for p in prompts)
    assert [len(a) for a in answers] == [steps] * 3
    assert vision == [2]  # both images in one tower call, at prefill only
    # prefill: the whole left-padded batch with the pixels, logits of the last position only (not (B, T, V));
    # each later step: one new token per row, no pixels (image positions are never embedded again)
    assert forwards == [((3, width), True, (3, 1, vocab))] + [((3, 1), False, (3, 1, vocab))] * (steps - 1)
