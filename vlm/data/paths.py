"""Safe image paths: a sample's image is a relative path that must stay inside its image folder.

Design choices:
- A path is `unsafe_path` when it is absolute, when `..` takes it out of the folder, or when a
  symlink (the file or a directory on the way) resolves outside the folder's real location. The
  first two are decided from the string alone, so even `--check_images none` refuses them; the
  symlink test needs the file system. A symlinked image folder itself is fine: the comparison is
  against its resolved location.
- Real datasets store absolute paths, so they are allowed on request (`allow_absolute=True`, the
  `--allow_absolute_image_paths` flag the refusal names). An absolute path under the folder keeps the
  folder's checks (its symlinks must stay inside); one elsewhere must resolve to a regular file
  (not a directory, device or FIFO), and the file it resolves to is the one opened.
- `missing_image`: the path does not exist (or is not a file). `unreadable_image`: it exists but
  `vlm.visual.processor.load_image` cannot decode it completely (corrupt, truncated, not an image,
  over the pixel limit). Only `mode="full"` decodes; `"exists"` stops at the file system.
- An embedded image (an `images` entry that is a dict: bytes, or a cell of a table, `vlm.data.embedded`) has
  no path to confine: its bytes are read (and decoded for "full"/`open`) from the table; a cell that names
  a file instead of holding bytes is that file under the folder, with the rules above.
- Errors are `SampleError`s without a sample position; the caller adds it (`sample.with_context`).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from vlm.data.embedded import EmbeddedPath, describe, read_bytes
from vlm.data.errors import SampleError
from vlm.errors import ConfigError
from vlm.visual.processor import PIL_DEFAULT_MAX_IMAGE_PIXELS, load_image

CHECK_MODES = ("full", "exists", "none")


class ImageFolder:
    """The folder a source's image paths are relative to (None: the source must be text-only)."""

    def __init__(self, root: str | os.PathLike | None, *, allow_absolute: bool = False):
        self.root = None if root is None else os.path.abspath(os.fspath(root))
        self._real = None if root is None else os.path.realpath(self.root)
        self.allow_absolute = allow_absolute

    def __repr__(self) -> str:
        extra = ", allow_absolute=True" if self.allow_absolute else ""
        return f"ImageFolder({self.root!r}{extra})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ImageFolder) and other.root == self.root
                and other.allow_absolute == self.allow_absolute)

    def __hash__(self) -> int:
        return hash((self.root, self.allow_absolute))

    def lexical(self, image: str) -> str:
        """The joined path, checked from the string alone (absolute, `..` escape)."""
        if os.path.isabs(image) or image.startswith(("/", "\\")):
            if not self.allow_absolute:
                raise SampleError("unsafe_path", f"image path {image!r} is absolute; paths must be relative to "
                                                 "--image_folder, or pass --allow_absolute_image_paths to accept "
                                                 "absolute paths")
            return os.path.normpath(image)
        if self.root is None:
            raise SampleError("missing_image", f"image {image!r} but no --image_folder was given for this source")
        joined = os.path.normpath(os.path.join(self.root, image))
        if not _inside(joined, self.root):
            raise SampleError("unsafe_path", f"image path {image!r} leaves --image_folder {self.root!r} through '..'")
        return joined

    def resolve(self, image: str) -> Path:
        """The image file inside the folder; SampleError `unsafe_path` or `missing_image` otherwise."""
        joined = self.lexical(image)
        real = os.path.realpath(joined)
        outside_by_request = self.allow_absolute and os.path.isabs(joined) and not (
            self.root is not None and _inside(joined, self.root))
        if outside_by_request:
            if not os.path.isfile(real):
                what = "is not a regular file" if os.path.exists(real) else "not found"
                raise SampleError("missing_image", f"absolute image path {image!r} {what}"
                                                   + (f" (it resolves to {real!r})" if real != joined else ""))
            return Path(real)
        if not _inside(real, self._real):
            raise SampleError(
                "unsafe_path", f"image {image!r} is a symlink (or under one) to {real!r}, outside --image_folder {self.root!r}"
            )
        if not os.path.isfile(real):
            what = "is not a file" if os.path.exists(real) else "not found"
            raise SampleError("missing_image", f"image {image!r} {what} under --image_folder {self.root!r}")
        return Path(joined)

    def check(self, image: str | dict, mode: str = "full", *,
              max_image_pixels: int | None = PIL_DEFAULT_MAX_IMAGE_PIXELS) -> None:
        """Raise the SampleError that `image` deserves under check `mode` ("full", "exists", "none").

        An embedded image (`vlm.data.embedded`): "exists" reads its bytes from the table, "full" decodes them."""
        if mode not in CHECK_MODES:
            raise ConfigError(f"image check mode {mode!r}; expected one of {CHECK_MODES}")
        if isinstance(image, dict):
            if mode != "none":
                self._embedded(image, decode=mode == "full", max_image_pixels=max_image_pixels)
            return
        if mode == "none":
            self.lexical(image)
            return
        path = self.resolve(image)
        if mode == "full":
            load(path, image, max_image_pixels=max_image_pixels).close()

    def open(self, image: str | dict, *, max_image_pixels: int | None = PIL_DEFAULT_MAX_IMAGE_PIXELS):
        """The decoded RGB image (a PIL image); SampleError for unsafe, missing or unreadable files or cells."""
        if isinstance(image, dict):
            return self._embedded(image, decode=True, max_image_pixels=max_image_pixels)
        return load(self.resolve(image), image, max_image_pixels=max_image_pixels)

    def _embedded(self, image: dict, *, decode: bool, max_image_pixels: int | None):
        """An embedded image's decoded RGB image (`decode`), else None once its bytes are read; a cell that names
        a file instead of holding its bytes is that file under this folder."""
        try:
            data = read_bytes(image)
        except EmbeddedPath as e:
            return self.open(e.path, max_image_pixels=max_image_pixels) if decode else self.check(e.path, "exists")
        return load(data, describe(image), max_image_pixels=max_image_pixels) if decode else None


class _NamedBytes(io.BytesIO):
    """An embedded image's bytes, named in messages (load_image's, and Pillow's, which show the file's repr)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self) -> str:
        return self.name


def load(path: Path | bytes, name: str, *, max_image_pixels: int | None):
    source = path if not isinstance(path, bytes) else _NamedBytes(path, name)
    try:
        return load_image(source, max_image_pixels=max_image_pixels)
    except FileNotFoundError:
        raise SampleError("missing_image", f"image {name!r} disappeared: {path}") from None
    except ValueError as e:  # ImageLoadError, or over the pixel limit
        raise SampleError("unreadable_image", str(e)) from None


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def resolve_image_path(image: str, image_folder: str | os.PathLike | None, *, allow_absolute: bool = False) -> Path:
    """`image` inside `image_folder` (or, with `allow_absolute`, an absolute path to a regular file); raises
    SampleError `unsafe_path` / `missing_image`."""
    return ImageFolder(image_folder, allow_absolute=allow_absolute).resolve(image)
