"""The part every VLM language-model subclass shares: vision modules, image encoding and the splice.

`VLMMixin` is mixed in front of a `transformers` causal-LM class (`class X(VLMMixin,
Qwen2ForCausalLM)`), as original LLaVA subclasses `LlamaForCausalLM`. Its forward embeds the ids,
replaces the image placeholder embeddings with projected image features, and hands `inputs_embeds`
to the parent's forward, which does everything else (attention, cache) unchanged. The training loss (labels
given, train mode) is computed at the supervised positions only (`vlm.llm.loss`): the same value and
gradients as the parent's, without (B, T, V) logits.

Generation needs nothing extra: `transformers`' `prepare_inputs_for_generation` forwards
`pixel_values` at prefill only, so images are encoded once per `generate` call, never per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from vlm.llm import varlen
from vlm.llm.loss import answer_log_probs, supervised_lm_loss
from vlm.llm.splice import image_token_mask, scatter_image_features


@dataclass
class AnswerLogProbs(ModelOutput):
    """What `forward(answer_labels=...)` returns: (B,) summed log-probabilities of each row's labelled tokens and
    (B,) their counts."""
    logps: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None


class VLMMixin:
    """Adds `vision_tower`, `mm_projector` and `vlm_config` to a causal LM and splices images in forward."""

    def __init__(self, config, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        # Attached by `vlm.model.build_model`; absent while `transformers` loads the LLM's own weights.
        self.vision_tower: nn.Module | None = None
        self.mm_projector: nn.Module | None = None
        self.vlm_config = None
        self._save_folder = None
        # True under DeepSpeed ZeRO-3 and FSDP (set by vlm.train.trainer.VLMTrainer): `_zero_vision_contribution`
        self.vision_on_text_only = False
        # Training loss (labels given, train mode): head + cross-entropy at supervised positions only (vlm.llm.loss),
        # no (B, T, V) logits; False: the parent's full-logits loss (train.py: --supervised_only_loss). loss_chunk_size:
        # rows of head + cross-entropy at a time (None: vlm.llm.loss's default, chunked and fused for a plain Linear
        # head, all rows at once for any other; no flag yet).
        self.supervised_only_loss = True
        self.loss_chunk_size: int | None = None

    def attach_vision(self, vision_tower: nn.Module, mm_projector: nn.Module, vlm_config, *, save_folder=None) -> None:
        """`save_folder(model, folder, state_dict=, max_shard_size=)` writes the model folder: passed in by the
        builder (`vlm.model`, layer 2: `vlm.folders.weights.save_model`), as this layer knows no folders."""
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.vlm_config = vlm_config
        self._save_folder = save_folder

    @property
    def image_token_id(self) -> int:
        return self.vlm_config.image_token_id

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, P, D_llm) projected features."""
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower attached; build it with vlm.build_model")
        features = self.vision_tower(pixel_values)  # (N, P, D_vision)
        return self.mm_projector(features.to(self._projector_dtype()))  # (N, P, D_llm)

    def _projector_dtype(self) -> torch.dtype:
        for p in self.mm_projector.parameters():
            return p.dtype
        return self.get_input_embeddings().weight.dtype

    def embed_multimodal(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                         *, prefill: bool = True, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and (N, 3, H, W) pixels -> (B, T, D) input embeddings with images spliced in.

        `image_index` (M,): the image (0..N-1) of each image run in reading order, where the rows use an image more
        than once or in another order (preference rows: each pair's chosen and rejected sides, padded or packed):
        each image is encoded once and its features are used for every run that shows it."""
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, D)
        if pixel_values is not None:
            features = self.encode_images(pixel_values)  # (N, P, D)
            if image_index is not None:
                features = features[image_index.to(features.device)]  # (M, P, D)
            return scatter_image_features(inputs_embeds, image_token_mask(input_ids, self.image_token_id), features)
        if prefill and self.vlm_config is not None:
            mask = image_token_mask(input_ids, self.image_token_id)
            if mask.any():
                # No pixels but placeholders: the same counted error as any other mismatch.
                empty = inputs_embeds.new_zeros((0, self.vlm_config.num_image_tokens, inputs_embeds.shape[-1]))
                scatter_image_features(inputs_embeds, mask, empty)
        return inputs_embeds

    def _zero_vision_contribution(self, inputs_embeds: torch.Tensor) -> torch.Tensor | float:
        """0 x (vision path), added to a text-only batch's embeddings: an exact zero that changes no value.

        Two paths, chosen by `vision_on_text_only`:
        - False (single process, DDP): the cheap one. Only the trainable part runs (the projector on one
          zero feature, or the whole path when the tower trains), so every trainable parameter gets a
          (zero) gradient; under DDP a rank whose batch has no image would otherwise leave the projector
          without one and the gradient all-reduce waiting for it.
        - True (DeepSpeed ZeRO-3 or FSDP, where parameters, frozen ones included, are sharded and gathered
          by collectives as their module runs): a zero image through the whole vision tower and projector,
          so a text-only rank gathers the same parameters in the same order as a rank with images;
          otherwise the ranks' all-gathers mismatch and training hangs or aborts.
        """
        if self.mm_projector is None:
            return 0.0
        if self.vision_on_text_only:
            whole_path = True
        elif any(p.requires_grad for p in self.mm_projector.parameters()):
            whole_path = not self.vision_tower.frozen
        else:
            return 0.0
        if whole_path:
            size = self.vision_tower.image_size
            dummy = self.encode_images(inputs_embeds.new_zeros(1, 3, size, size))
        else:
            # one image's worth of features: a merging projector (vlm.projector.merge) needs the whole grid
            dummy = self.mm_projector(inputs_embeds.new_zeros(1, self.vision_tower.num_image_tokens,
                                                               self.vision_tower.hidden_size,
                                                               dtype=self._projector_dtype()))
        return 0.0 * dummy.sum()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        """Causal-LM forward with images: input_ids (B, T), pixel_values (N, 3, H, W) -> logits (B, T, V).

        `labels` (B, T) are unshifted, -100 where not supervised; the parent's loss shifts them and
        honours `num_items_in_batch` (loss normalised over a whole gradient-accumulation window).

        Preference training (`vlm.train.dpo`) passes two more keywords: `answer_labels` (B, T), labelled like
        `labels`, returns `AnswerLogProbs` (each row's summed log-probability of its labelled tokens, computed at
        those positions only) instead of logits; `image_index` (see `embed_multimodal`) encodes each image once
        for rows that use the batch's images more than once. Packed pair rows add
        `answer_sequence_index` (B, T): the sequence each position belongs to; the log-probabilities are then per
        sequence, not per row (`vlm.llm.loss.answer_log_probs`).
        """
        answer_labels = kwargs.pop("answer_labels", None)
        answer_sequence_index = kwargs.pop("answer_sequence_index", None)
        image_index = kwargs.pop("image_index", None)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            prefill = past_key_values is None or past_key_values.get_seq_length() == 0
            inputs_embeds = self.embed_multimodal(input_ids, pixel_values, prefill=prefill, image_index=image_index)
            # ZeRO-3: in every forward that could have run the vision path (eval too, not decoding steps)
            needs_zero = self.vision_on_text_only and prefill or self.training and torch.is_grad_enabled()
            if pixel_values is None and needs_zero:
                inputs_embeds = inputs_embeds + self._zero_vision_contribution(inputs_embeds)
        elif pixel_values is not None:
            raise ValueError("pass pixel_values with input_ids, not with inputs_embeds (the splice needs the ids)")
        if past_key_values is None and attention_mask is None and position_ids is not None:
            # Packed rows (vlm.data.collate.PackingCollator): transformers builds the block-diagonal mask from
            # position ids only when there is no cache, and the model would create an empty one (use_cache).
            use_cache = False
            if self.config._attn_implementation == varlen.NAME:
                # each sample's own causal attention from its boundaries, found once for all layers
                kwargs.update(varlen.packed_sequence_kwargs(position_ids.expand(inputs_embeds.shape[0], -1)))
            elif inputs_embeds.shape[0] > 1 and "flash" in str(self.config._attn_implementation):
                # flash-attn's varlen path reads packed position ids in one row only; more rows would attend across
                if answer_labels is not None:
                    return self._answer_log_probs_as_one_row(inputs_embeds, position_ids, answer_labels,
                                                             answer_sequence_index, kwargs)
                return self._forward_as_one_row(inputs_embeds, position_ids, labels, kwargs)
        if answer_labels is not None:
            return self._forward_answer_log_probs(inputs_embeds, attention_mask, position_ids, answer_labels,
                                                  answer_sequence_index, kwargs)
        # `skip_logits`: an evaluation that keeps only the loss (vlm.train.trainer.VLMTrainer.prediction_step; the
        # keyword transformers' Trainer passes for Liger kernels) takes the training path: no (B, T, V) logits
        skip_logits = kwargs.pop("skip_logits", False)
        if labels is not None and self.supervised_only_loss and (self.training or skip_logits):
            return self._forward_supervised_loss(inputs_embeds, attention_mask, position_ids, labels, kwargs)
        return super().forward(
            input_ids=None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _forward_supervised_loss(self, inputs_embeds, attention_mask, position_ids, labels, kwargs):
        """The training forward without (B, T, V) logits: `logits` is None, `loss` equals the parent's.

        In train mode, and in an evaluation that asks for the loss only (`skip_logits`); other evaluation and
        generation take the parent's path and get full logits.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, **kwargs)
        loss = supervised_lm_loss(outputs.last_hidden_state, labels, self.lm_head, shift_labels=shift_labels,
                                  num_items_in_batch=num_items_in_batch, chunk_size=self.loss_chunk_size)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)

    def _forward_answer_log_probs(self, inputs_embeds, attention_mask, position_ids, answer_labels,
                                  answer_sequence_index, kwargs):
        """Each row's (packed rows: each sequence's) summed log-probability of its labelled tokens
        (`vlm.llm.loss.answer_log_probs`), no (B, T, V) logits unless `supervised_only_loss` is off; in train and
        eval mode alike (the policy and the reference of preference training)."""
        kwargs.pop("num_items_in_batch", None)
        outputs = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, **kwargs)
        logps, num_tokens = answer_log_probs(outputs.last_hidden_state, answer_labels, self.lm_head,
                                             sequence_index=answer_sequence_index,
                                             all_positions=not self.supervised_only_loss)
        return AnswerLogProbs(logps=logps, num_tokens=num_tokens)

    def _forward_as_one_row(self, inputs_embeds, position_ids, labels, kwargs):
        """Packed rows (B, T) run as one row (1, B*T): each row starts a new sample, so nothing changes but the
        shape; logits come back as (B, T, V)."""
        rows, width = inputs_embeds.shape[:2]
        flat = {"labels": labels.reshape(1, -1) if labels is not None else None}
        out = self.forward(inputs_embeds=inputs_embeds.reshape(1, rows * width, -1),
                           position_ids=position_ids.expand(rows, -1).reshape(1, -1), **flat, **kwargs)
        if out.logits is not None:
            out.logits = out.logits.reshape(rows, width, -1)
        return out

    def _answer_log_probs_as_one_row(self, inputs_embeds, position_ids, answer_labels, answer_sequence_index, kwargs):
        """`_forward_as_one_row` for answer log-probabilities: the rows joined into one, each position keeping its
        sequence (its row's, or `answer_sequence_index`'s), so the sums stay per sequence."""
        rows, width, dim = inputs_embeds.shape
        if answer_sequence_index is None:
            answer_sequence_index = torch.arange(rows, device=answer_labels.device)[:, None].expand(rows, width)
        one_row = lambda x: x.expand(rows, width).reshape(1, rows * width)  # noqa: E731
        return self._forward_answer_log_probs(inputs_embeds.reshape(1, rows * width, dim), None, one_row(position_ids),
                                              one_row(answer_labels), one_row(answer_sequence_index), kwargs)

    def save_pretrained(self, save_directory, state_dict: dict | None = None, **kwargs: Any) -> None:
        """Write the vlm model folder (`config.json` + safetensors); `transformers.Trainer` calls this too."""
        if self._save_folder is None:
            raise TypeError(f"{type(self).__name__} has no vision modules attached; build it with vlm.build_model")
        self._save_folder(self, save_directory, state_dict=state_dict, max_shard_size=kwargs.get("max_shard_size", "5GB"))
