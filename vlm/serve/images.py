"""An `image_url` of a chat request -> a decoded, checked image, or a `RequestError` (HTTP 400) saying why.

Accepted, as OpenAI's API takes them plus local files for a server on one's own machine:
- `data:image/<type>;base64,<data>` (what the page and most clients send);
- a file path or `file://` URL, only under the folder given at start (`vlm serve --image_folder DIR`): relative
  paths are relative to it, absolute ones must lie inside it, and neither `..` nor a symlink may lead out
  (`vlm.data.paths.ImageFolder`, the same confinement as training images);
- `http(s)://` only with `--allow_remote_images True` (off by default: a server that fetches any URL it is
  given can be made to reach the network behind it).

Every image is at most `max_bytes` bytes (checked before decoding; remote reads stop there) and
`max_pixels` pixels (checked from the header, before the pixels are decoded), and must decode
completely (`vlm.visual.processor.load_image`).
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from vlm.errors import ConfigError, UserError
from vlm.serve.protocol import RequestError
from vlm.visual.processor import PIL_DEFAULT_MAX_IMAGE_PIXELS, load_image

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024  # OpenAI's documented limit per image


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how large they may be."""

    folder: str | None = None  # local files allowed under this folder; None: no local files
    allow_remote: bool = False
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = PIL_DEFAULT_MAX_IMAGE_PIXELS
    timeout_s: float = 10.0  # for remote images

    def __post_init__(self) -> None:
        if self.folder is not None and not os.path.isdir(self.folder):
            raise ConfigError(f"--image_folder {self.folder!r} is not a folder; give an existing folder of images, "
                              "or leave it out to accept only data URLs")
        if self.max_bytes < 1:
            raise ConfigError(f"--max_image_bytes={self.max_bytes} must be >= 1")
        if self.max_pixels < 1:
            raise ConfigError(f"--max_image_pixels={self.max_pixels} must be >= 1")


def load_image_url(url: str, policy: ImagePolicy, *, param: str | None = None) -> Any:
    """The image `url` names, decoded to RGB (a PIL image); `RequestError` naming `param` when it is refused."""
    data = image_bytes(url, policy, param=param)
    try:
        return load_image(data, max_image_pixels=policy.max_pixels)
    except UserError as exc:  # undecodable, truncated, too many pixels
        raise RequestError(f"image {_short(url)}: {exc}", param=param, code="invalid_image") from None


def image_bytes(url: str, policy: ImagePolicy, *, param: str | None = None) -> bytes:
    """The bytes of the image file `url` names, at most `policy.max_bytes` of them."""
    if url.startswith("data:"):
        return _data_url(url, policy, param)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise RequestError(f"remote image URL {_short(url)} is not allowed by this server; send the image as a "
                               "data URL (data:image/png;base64,...), or start vlm serve with --allow_remote_images "
                               "True", param=param, code="remote_image_not_allowed")
        return _remote(url, policy, param)
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RequestError(f"file URL {_short(url)} names host {parts.netloc!r}; only local files",
                               param=param, code="invalid_image_url")
        return _local(urllib.parse.unquote(parts.path), url, policy, param)
    if len(scheme) > 1:  # a:/b on Windows is a drive letter, not a scheme
        raise RequestError(f"image URL scheme {scheme!r} in {_short(url)} is not supported; use a data URL, a "
                           "file path under the server's --image_folder, or http(s) when allowed",
                           param=param, code="invalid_image_url")
    return _local(url, url, policy, param)


def _data_url(url: str, policy: ImagePolicy, param: str | None) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    media_type, *options = header.split(";")
    if not comma or "base64" not in options:
        raise RequestError("image data URL must be data:image/<type>;base64,<data>", param=param,
                           code="invalid_image_url")
    if media_type and not media_type.lower().startswith("image/"):
        raise RequestError(f"image data URL has media type {media_type!r}; expected image/png, image/jpeg, ...",
                           param=param, code="invalid_image_url")
    if len(payload) // 4 * 3 > policy.max_bytes + 3:  # before decoding: base64 is 4 chars per 3 bytes
        raise _too_big(f"about {len(payload) // 4 * 3}", policy, param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image data URL is not valid base64", param=param, code="invalid_image") from None
    if len(data) > policy.max_bytes:
        raise _too_big(str(len(data)), policy, param)
    return data


def _local(path: str, url: str, policy: ImagePolicy, param: str | None) -> bytes:
    from vlm.data.errors import SampleError
    from vlm.data.paths import ImageFolder

    if policy.folder is None:
        raise RequestError(f"local image file {_short(url)} is not allowed: this server takes local files only "
                           "under --image_folder DIR given at start; send the image as a data URL", param=param,
                           code="local_image_not_allowed")
    folder = ImageFolder(policy.folder)
    if "\x00" in path or not path:
        raise RequestError(f"image path {path!r} is not a file name", param=param, code="invalid_image_url")
    if os.path.isabs(path):  # absolute but inside the folder: checked as a relative path
        normal = os.path.normpath(path)
        if not normal.startswith(folder.root + os.sep):
            raise RequestError(f"image path {path!r} is outside the server's --image_folder", param=param,
                               code="image_path_not_allowed")
        path = os.path.relpath(normal, folder.root)
    try:
        resolved = folder.resolve(path)
    except SampleError as exc:
        code = "image_path_not_allowed" if exc.reason == "unsafe_path" else "image_not_found"
        detail = exc.detail.replace(repr(folder.root), "the server's --image_folder")  # not the server's layout
        raise RequestError(f"image {path!r}: {detail}", param=param, code=code) from None
    size = os.path.getsize(resolved)
    if size > policy.max_bytes:
        raise _too_big(str(size), policy, param)
    with open(resolved, "rb") as f:
        return f.read()


def _remote(url: str, policy: ImagePolicy, param: str | None) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "vlm-serve"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:  # noqa: S310 (scheme checked)
            data = response.read(policy.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RequestError(f"image URL {_short(url)} could not be fetched: {getattr(exc, 'reason', exc)}",
                           param=param, code="image_fetch_failed") from None
    if len(data) > policy.max_bytes:
        raise _too_big(f"more than {policy.max_bytes}", policy, param)
    return data


def _too_big(size: str, policy: ImagePolicy, param: str | None) -> RequestError:
    return RequestError(f"image is {size} bytes; this server takes images up to {policy.max_bytes} bytes "
                        "(--max_image_bytes)", param=param, code="image_too_large")


def _short(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:60] + "...")
