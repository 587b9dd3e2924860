"""Serving a model over HTTP (layer 3): an OpenAI-compatible chat API and a chat page, one module per job:

- `protocol`: OpenAI's chat-completions request (validated once) -> a conversation and image URLs; the
  response, stream-chunk and error objects; `RequestError` (HTTP 400/503 with OpenAI's error object).
- `images`: an `image_url` (data URL, file under the allowed folder, remote URL when allowed) -> a checked image.
- `batching`: the bounded request queue and the worker thread that batches waiting requests into one call of
  the one decode loop (`vlm.generate.decoding`).
- `app`: the FastAPI app (`/v1/chat/completions`, `/v1/models`, `/health`, the page at `/`).
- `static/index.html`: the chat page (plain HTML and JavaScript on the same API; no extra dependency).

The command is `vlm serve` (`vlm.cli.serve`); FastAPI and uvicorn come with `pip install 'vlm-kit[serve]'`.
"""
