"""Running a model (layer 3), one module per job:

- `prompts`: which chat template to prompt a folder's model with (its own; another only when forced) and whether
  a prompt fits the context. The ids themselves: `vlm.processing.build_prompt` (layer 2, shared with the processor).
- `decoding`: the one decode loop (`decode_prompts`: left-padded batches, KV cache, greedy or sampled, streaming).
- `generator`: `Generator` (a loaded model that answers), `load_generator`, and `vlm.load` / `vlm.answer`.
- `chat`: a multi-turn chat session; `batch`: answering a file of questions.

Their commands (`vlm ask`, `chat`, `generate`, `eval`) are in `vlm.cli`.
"""
