"""`vlm serve --model PATH [--port 8000]`: an OpenAI-compatible chat API and a chat page for a model.

    vlm serve --model runs/demo/model                # then open http://127.0.0.1:8000/
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "model", "messages": [{"role": "user", "content": "What color is the circle?"}]}'

The server is `vlm.serve.app` (FastAPI, run by uvicorn): `pip install 'vlm-kit[serve]'`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from vlm.errors import ConfigError, MissingDependencyError


def build_parser() -> argparse.ArgumentParser:
    from vlm.cli.options import add_decoding_arguments, add_model_arguments, true_or_false
    from vlm.serve.images import DEFAULT_MAX_IMAGE_BYTES
    from vlm.visual.processor import PIL_DEFAULT_MAX_IMAGE_PIXELS

    parser = argparse.ArgumentParser(prog="vlm serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    # the defaults for requests that name none; clients' special-token strings are text unless told otherwise
    add_decoding_arguments(parser, max_new_tokens=256, escape_special_tokens=True)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 for every interface)")
    server.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    server.add_argument("--served_model_name", "--served-model-name", dest="served_model_name", default=None,
                        help="the model id clients send (default: the model folder's name)")
    server.add_argument("--max_batch_size", "--max-batch-size", dest="max_batch_size", type=int, default=8,
                        help="requests decoded together in one generate call (default 8; 1 turns batching off)")
    server.add_argument("--batch_wait_ms", "--batch-wait-ms", dest="batch_wait_ms", type=float, default=10.0,
                        help="how long the first request of a batch waits for others (default 10 ms)")
    server.add_argument("--max_queue", "--max-queue", dest="max_queue", type=int, default=64,
                        help="requests that may wait; more get HTTP 503 (default 64)")
    server.add_argument("--max_request_bytes", "--max-request-bytes", dest="max_request_bytes", type=int,
                        default=64 * 1024 * 1024, help="largest request body; larger ones get HTTP 413 (default 64 MiB)")
    images = parser.add_argument_group("images")
    images.add_argument("--image_folder", "--image-folder", dest="image_folder", default=None,
                        help="folder whose files requests may name by path or file:// URL (default: none; only "
                             "data URLs)")
    images.add_argument("--allow_remote_images", "--allow-remote-images", dest="allow_remote_images",
                        type=true_or_false, default=False, metavar="{True,False}",
                        help="fetch http(s) image URLs (default False)")
    images.add_argument("--max_image_bytes", "--max-image-bytes", dest="max_image_bytes", type=int,
                        default=DEFAULT_MAX_IMAGE_BYTES, help=f"largest image file (default {DEFAULT_MAX_IMAGE_BYTES})")
    images.add_argument("--max_image_pixels", "--max-image-pixels", dest="max_image_pixels", type=int,
                        default=PIL_DEFAULT_MAX_IMAGE_PIXELS,
                        help=f"largest image in pixels, width x height (default {PIL_DEFAULT_MAX_IMAGE_PIXELS})")
    parser.add_argument("--log_level", "--log-level", dest="log_level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"], help="server log level")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError(f"vlm serve needs {exc.name}: pip install 'vlm-kit[serve]'") from None
    import logging

    from vlm.cli.options import generator_from_args
    from vlm.serve.app import create_app

    config = serve_config(args)  # everything the flags say is checked before the model loads
    check_port_free(args.host, args.port)
    generator = generator_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(generator, config)
    name = config.model_name
    print(f"vlm serve: {name!r} on http://{args.host}:{args.port}/ (chat page), API at "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def serve_config(args):
    """The server's settings from the parsed flags (`vlm.serve.app.ServeConfig`, validated there)."""
    from vlm.serve.app import ServeConfig
    from vlm.serve.images import ImagePolicy

    return ServeConfig(model_name=args.served_model_name or os.path.basename(os.path.normpath(args.model)),
                       max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                       max_request_bytes=args.max_request_bytes, escape_special_tokens=args.escape_special_tokens,
                       images=ImagePolicy(folder=args.image_folder, allow_remote=args.allow_remote_images,
                                          max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels))


def check_port_free(host: str, port: int) -> None:
    """ConfigError naming the port when it cannot be listened on (taken, or not ours), before the model loads."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} must be in 0..65535")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port, or stop "
                          "the program using it") from None
