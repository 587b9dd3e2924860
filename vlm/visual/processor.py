"""Images in, `pixel_values` out: loading an image file safely and turning it into a normalised tensor.

Two jobs, kept apart:

* `load_image(source)` reads a file (path, bytes or file object) into an RGB `PIL.Image`: EXIF
  orientation applied, transparency composited on white, any other mode (CMYK, L, 1, 16-bit, float,
  YCbCr ...) converted to 8-bit RGB, the first frame of an animation or multi-page file. The whole
  file is decoded here, so a truncated or corrupt file fails at load time with `ImageLoadError`
  naming the file, not later inside a training step. Pillow's decompression-bomb limit stays on and
  is an argument; it is set only around the decode and restored afterwards.
* `ImageProcessor(config)(images, return_tensors="pt")["pixel_values"]` turns images into a float32
  tensor (N, 3, H, W), called as transformers' image processors are (`__call__` and `preprocess` are
  the same, and return a `transformers.BatchFeature`), so code written against LLaVA or transformers
  runs unchanged, and ours calls it the same way. One of three geometries
  (`ImageProcessorConfig.aspect_ratio`):
    - `pad`:    pad to a square in the mean colour, content centred, then resize (LLaVA-1.5's
                `expand2square` followed by its CLIP processor; the fill is int(mean * 255),
                truncated as LLaVA and transformers' LlavaImageProcessor do);
    - `resize`: resize straight to image_size x image_size (transformers' SiglipImageProcessor);
    - `crop`:   resize the shortest edge to image_size, then centre-crop (CLIPImageProcessor).

Numerics follow transformers' PIL-backend processors (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`,
which `CLIPImageProcessor` falls back to when torchvision is absent): resize the 8-bit image with
PIL, crop, rescale in float64 then cast to float32, normalise in float32. The outputs are
bit-identical to theirs (tests/test_processor.py). The torchvision backend resizes differently
(antialiased tensor interpolation), so it is not the reference. Two shortcuts keep those bits: the
normalisation is a lookup in a (3, 256) table computed with that arithmetic (applied by Pillow's `point`), and
a wide image is padded after Pillow's horizontal pass instead of before it (`_pad_rows_and_resize`). What is
left of a 640x480 JPEG's time (bench/data.py --split) is libjpeg's decode and Pillow's two resampling passes,
both needed as they are for those bits. JPEG draft decoding (libjpeg's 1/2..1/8 scales) is faster for large
photos but moves pixels, so it is opt-in: `ImageProcessor.load(..., draft=True)`.

`save_pretrained` writes a `preprocessor_config.json` that transformers' CLIPImageProcessor (crop, pad)
or SiglipImageProcessor (resize) loads with the same geometry, plus our key `image_aspect_ratio`;
`from_pretrained` reads ours and theirs. Mean/std defaults come from the vision config's
`model_type` (CLIP or SigLIP), never from a model name.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from vlm.errors import ConfigError, MissingPathError, UserError

if TYPE_CHECKING:
    from transformers import BatchFeature

PIL_DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default for Image.MAX_IMAGE_PIXELS
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# Published normalisation constants (equal to transformers.image_utils' OPENAI_CLIP_* and IMAGENET_STANDARD_*).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

ASPECT_RATIOS = ("pad", "resize", "crop")
RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESAMPLE_NAME_BY_CODE = {int(code): name for name, code in RESAMPLE.items()}

# Defaults of the transformers processor classes we read, for keys their JSON may leave out.
_CLIP_DEFAULTS: dict[str, Any] = {
    "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "resample": 3,
    "size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
}
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": _CLIP_DEFAULTS,
    "LlavaImageProcessor": _CLIP_DEFAULTS,  # CLIP's processor plus `do_pad` (expand to square)
    "SiglipImageProcessor": {
        "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD, "resample": 3,
        "size": {"height": 224, "width": 224}, "do_center_crop": False,
    },
}
# vision config model_type -> the processor class its checkpoints ship with
_PROCESSOR_BY_MODEL_TYPE = {
    "clip": "CLIPImageProcessor",
    "clip_vision_model": "CLIPImageProcessor",
    "siglip": "SiglipImageProcessor",
    "siglip_vision_model": "SiglipImageProcessor",
}


# ----------------------------------------------------------------------------------------------
# Loading


class ImageLoadError(UserError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not an image)."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot read image {source!r}: {reason}")


_PIXEL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pixel_limit(max_image_pixels: int | None) -> Iterator[None]:
    """Set Pillow's process-wide `Image.MAX_IMAGE_PIXELS` for the duration of one decode.

    Unchanged when it already has the requested value (no lock, decodes stay parallel); otherwise
    the lock keeps two threads from restoring each other's value and leaving it changed. A thread
    decoding with the default at that same moment may see the other limit (data-loader workers are
    processes, so this only concerns threaded callers that pass different limits).
    """
    if Image.MAX_IMAGE_PIXELS == max_image_pixels:
        yield
        return
    with _PIXEL_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_image_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _too_large(name: str, pixels: int | None, limit: int | None) -> UserError:
    count = f"{pixels} pixels" if pixels is not None else "too many pixels"
    return UserError(
        f"image {name!r} has {count}, more than the limit max_image_pixels={limit} (Pillow's "
        "decompression-bomb guard); if you trust the file, raise the limit with "
        "load_image(..., max_image_pixels=<larger>) or disable it with max_image_pixels=None"
    )


def _describe_source(source: Any) -> tuple[str, str | IO[bytes]]:
    """(name used in messages, what to hand to `Image.open`)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>", io.BytesIO(bytes(source))
    if hasattr(source, "read"):
        return str(getattr(source, "name", "<file object>")), source
    raise TypeError(f"load_image expects a path, bytes or a binary file object, got {type(source).__name__}")


def load_image(
    source: str | os.PathLike | bytes | IO[bytes],
    *,
    max_image_pixels: int | None = PIL_DEFAULT_MAX_IMAGE_PIXELS,
    draft: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Decode an image file completely into an 8-bit RGB `PIL.Image` (see `to_rgb` for the modes).

    Args:
        source: a path, the file's bytes, or a binary file object.
        max_image_pixels: refuse images with more pixels than this (width * height); None disables
            the check. Applied through Pillow's `Image.MAX_IMAGE_PIXELS`, restored afterwards.
        draft: opt-in JPEG draft decoding: called with the stored (width, height), it returns the
            smallest (width, height) the caller needs; a JPEG is then decoded by libjpeg at 1/2, 1/4 or
            1/8 scale when both sides stay at least that large (`Image.draft`). Faster for large photos,
            but the pixels differ from a full decode (`ImageProcessor.load`'s docstring has the figures).

    Raises:
        FileNotFoundError: the path does not exist.
        UserError: the image has more than `max_image_pixels` pixels.
        MissingPathError: no such file.
        ImageLoadError (a UserError, so a ValueError): the file cannot be decoded; names the file and Pillow's reason.
    """
    if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or max_image_pixels <= 0):
        raise ConfigError(f"max_image_pixels must be a positive int or None, got {max_image_pixels!r}")
    name, opened = _describe_source(source)
    with _pixel_limit(max_image_pixels), _pillow_errors(name, max_image_pixels):
        image = Image.open(opened)  # reads the header only
    with image:
        # Pillow only warns between its limit and twice the limit: here the limit is strict.
        if max_image_pixels is not None and image.width * image.height > max_image_pixels:
            raise _too_large(name, image.width * image.height, max_image_pixels)
        with _pixel_limit(max_image_pixels), _pillow_errors(name, max_image_pixels):
            if draft is not None and image.format == "JPEG":
                image.draft(None, draft(image.width, image.height))  # the mode stays; only the DCT scale
            image.load()  # decode now, so a truncated file fails here; animations stay on frame 0
        with _pillow_errors(name, max_image_pixels):  # a broken EXIF block, an unconvertible mode
            upright = ImageOps.exif_transpose(image, in_place=True) or image
            if upright.mode == "RGB" and "transparency" not in upright.info:
                # already what to_rgb makes, and decoded into memory: leaving the `with` closes only the file
                # (Pillow >= 10), so the image is returned as it is instead of copied (a 640x480 copy: ~0.2 ms)
                return upright
            return to_rgb(upright)


@contextlib.contextmanager
def _pillow_errors(name: str, max_image_pixels: int | None) -> Iterator[None]:
    """Translate Pillow's exceptions into ours, each naming the file."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(name, int(found.group(1)) if found else None, max_image_pixels) from None
    except FileNotFoundError:
        raise MissingPathError(f"image file not found: {name!r}") from None
    except Exception as exc:  # Pillow reports bad files as OSError, SyntaxError, ValueError, EOFError ...
        raise ImageLoadError(name, f"{type(exc).__name__}: {exc}") from exc


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float single-channel image -> "L" (or "LA" with its transparency key).

    I;16: full 16-bit range mapped to 0..255. I (32-bit int): the same when all values fit in
    0..65535 (16-bit PNG/TIFF data), otherwise its min..max stretched to 0..255. F: values in
    0..1 scaled by 255, otherwise min..max stretched. Pillow's own convert("L") clips instead,
    turning most 16-bit images white.
    """
    values = np.nan_to_num(np.asarray(image).astype(np.float64))  # (H, W)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values * (255 / 65535)
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    key = image.info.get("transparency")
    if isinstance(key, (int, float)):
        alpha = np.where(np.asarray(image) == key, 0, 255).astype(np.uint8)
        return Image.merge("LA", (gray, Image.fromarray(alpha, mode="L")))
    return gray


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels are composited on white (as transformers does).

    Transparency means an alpha band (RGBA, LA, PA and the premultiplied RGBa, La) or a
    `transparency` entry in `image.info` (P, L, RGB, 16-bit). Other modes (CMYK, YCbCr, 1, L, P ...)
    use Pillow's conversion; ICC profiles are not applied.
    """
    if image.mode in _HIGH_DEPTH_MODES:
        image = _to_8bit(image)
    if image.mode == "La":  # premultiplied; Pillow converts it to RGBA only through LA
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # a copy even when already RGB


# ----------------------------------------------------------------------------------------------
# Configuration


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ConfigError(f"ImageProcessorConfig.{name} must be 3 numbers (one per RGB channel), got {value!r}")
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"ImageProcessorConfig.{name} must be 3 numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise ConfigError(f"ImageProcessorConfig.{name} must be finite, got {value!r}")
    return numbers  # type: ignore[return-value]


MAX_IMAGE_SIZE = 8_192  # px per side; vlm.config.SIZE_BOUNDS bounds the tower's image_size the same way


@dataclass
class ImageProcessorConfig:
    """How images become `pixel_values`: square output of `image_size`, normalised per channel.

    `aspect_ratio`: "pad" (expand to a square in the mean colour, then resize), "resize" (stretch to
    the square) or "crop" (shortest edge to image_size, then centre-crop). `resample`: a PIL filter
    name (`RESAMPLE`). Pixels are computed as (value * rescale_factor - mean) / std.
    """

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    aspect_ratio: str = "pad"
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ConfigError(f"ImageProcessorConfig.image_size must be a positive int, got {self.image_size!r}")
        if self.image_size > MAX_IMAGE_SIZE:  # checked before any image is resized to it (minutes, then MemoryError)
            raise ConfigError(f"ImageProcessorConfig.image_size={self.image_size} is beyond any vision tower's input "
                             f"(at most {MAX_IMAGE_SIZE} px); fix the size in the image-processor config")
        self.image_mean = _three_floats("image_mean", self.image_mean)
        self.image_std = _three_floats("image_std", self.image_std)
        if min(self.image_std) <= 0:
            raise ConfigError(f"ImageProcessorConfig.image_std must be > 0 per channel, got {self.image_std}")
        if self.aspect_ratio not in ASPECT_RATIOS:
            raise ConfigError(
                f"ImageProcessorConfig.aspect_ratio must be one of {ASPECT_RATIOS}, got {self.aspect_ratio!r}"
            )
        if self.resample not in RESAMPLE:
            raise ConfigError(f"ImageProcessorConfig.resample must be one of {tuple(RESAMPLE)}, got {self.resample!r}")
        factor = self.rescale_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
            raise ConfigError(f"ImageProcessorConfig.rescale_factor must be a positive number, got {factor!r}")
        self.rescale_factor = float(factor)
        if self.aspect_ratio == "pad" and not all(0 <= m / factor <= 255 for m in self.image_mean):
            raise ConfigError(
                f"ImageProcessorConfig.image_mean {self.image_mean} / rescale_factor {factor} is not a colour in "
                "0..255, so it cannot fill the padding of aspect_ratio='pad'; use 'resize' or 'crop'"
            )

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The 8-bit fill for aspect_ratio='pad': the mean colour, truncated (LLaVA's int(mean * 255)).

        Truncated rather than rounded so the padding is bit-identical to LLaVA-1.5's `expand2square`
        and transformers' LlavaImageProcessor (rounding would differ by one grey level for CLIP's mean).
        """
        return tuple(int(m / self.rescale_factor) for m in self.image_mean)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, for embedding in a model config."""
        values = asdict(self)
        values["image_mean"] = list(self.image_mean)
        values["image_std"] = list(self.image_std)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageProcessorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ImageProcessorConfig keys {unknown}; expected some of {sorted(known)}")
        missing = [name for name in ("image_size", "image_mean", "image_std") if name not in values]
        if missing:
            raise ConfigError(f"ImageProcessorConfig needs {missing}; got keys {sorted(values)}")
        return cls(**values)


# ----------------------------------------------------------------------------------------------
# The processor

_RETURN_TENSORS = ("pt", "np", None)
ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, Sequence[Union[Image.Image, np.ndarray, torch.Tensor]]]


def _array_to_pil(array: np.ndarray, index: int) -> Image.Image:
    """A uint8 (H, W), (H, W, C) or (C, H, W) array, C in {1, 3} -> PIL image (transformers' channel rule)."""
    if array.dtype != np.uint8:
        raise TypeError(
            f"image {index} is an array of dtype {array.dtype}; only uint8 arrays (0..255) are read, as "
            "float arrays are ambiguous about their range: convert with (a * 255).round().astype(np.uint8) "
            "or pass PIL images"
        )
    if array.ndim == 3 and array.shape[0] in (1, 3):  # channels first wins, as in transformers
        array = array.transpose(1, 2, 0)
    elif not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3))):
        raise TypeError(f"image {index} has shape {array.shape}; expected (H, W), (H, W, C) or (C, H, W), C in (1, 3)")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array), mode="L" if array.ndim == 2 else "RGB")


def _as_pil_list(images: ImageInput) -> list[Image.Image]:
    """One image, a list of images or a 4-D array batch -> a non-empty list of PIL images."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, Image.Image):
        images = [images]
    elif isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence):
        raise TypeError(
            f"ImageProcessor expects PIL images or uint8 arrays, got {type(images).__name__} "
            "(read files with load_image)"
        )
    batch = []
    for index, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            image = _array_to_pil(image, index)
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"image {index} is a {type(image).__name__}, expected a PIL.Image or a uint8 array "
                "(read files with load_image)"
            )
        batch.append(image)
    if not batch:
        raise ValueError("ImageProcessor got an empty list of images")
    return batch



class ImageProcessor:
    """RGB `PIL.Image`s -> float32 `pixel_values` (N, 3, image_size, image_size)."""

    def __init__(self, config: ImageProcessorConfig):
        if not isinstance(config, ImageProcessorConfig):
            raise TypeError(f"ImageProcessor expects an ImageProcessorConfig, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"ImageProcessor({self.config})"

    # What LLaVA's code reads besides the call (`expand2square(image, int(x * 255) for x in image_mean)`,
    # a blank (3, crop_size["height"], crop_size["width"]) image for text-only samples). Read-only: the
    # config is the one place these are set.
    @property
    def image_mean(self) -> list[float]:
        return list(self.config.image_mean)

    @property
    def image_std(self) -> list[float]:
        return list(self.config.image_std)

    @property
    def crop_size(self) -> dict[str, int]:
        """The output size, {"height": image_size, "width": image_size}."""
        return {"height": self.config.image_size, "width": self.config.image_size}

    def __call__(self, images: ImageInput, return_tensors: str | None = None, **kwargs: Any) -> BatchFeature:
        """Images -> `BatchFeature` with "pixel_values", as transformers' image processors.

        Args:
            images: one image or a list of them: `PIL.Image` (any mode, converted with `to_rgb`), or
                uint8 numpy arrays / torch tensors shaped (H, W), (H, W, C) or (C, H, W) with C in
                {1, 3} (channels first when both ends could be channels, as transformers assumes);
                a 4-D array is a batch.
            return_tensors: "pt" -> torch float32 (N, 3, H, W); "np" -> numpy float32 (N, 3, H, W);
                None -> a list of N numpy float32 arrays (3, H, W) (transformers' default).

        Raises:
            TypeError: an image of another type or dtype, or a keyword argument this processor does
                not implement (transformers' per-call overrides such as `size=` or `do_pad=`).
            ValueError: no images, or an unknown `return_tensors`.
        """
        if kwargs:
            raise TypeError(
                f"ImageProcessor does not take {sorted(kwargs)}; its geometry and normalisation come from "
                f"its ImageProcessorConfig ({self.config}); build another ImageProcessor to change them"
            )
        if return_tensors not in _RETURN_TENSORS:
            raise ValueError(
                f"return_tensors={return_tensors!r} is not supported; use one of {_RETURN_TENSORS}"
            )
        from transformers import BatchFeature

        batch = _as_pil_list(images)
        size = self.config.image_size
        pixels = np.empty((len(batch), 3, size, size), dtype=np.float32)  # (N, 3, H, W), filled in place
        for image, out in zip(batch, pixels):
            self._pixels_into(image, out)
        if return_tensors == "pt":
            values: Any = torch.from_numpy(pixels)
        elif return_tensors == "np":
            values = pixels
        else:
            values = list(pixels)
        return BatchFeature(data={"pixel_values": values})

    preprocess = __call__  # LLaVA calls `image_processor.preprocess(image, return_tensors="pt")`

    def _geometry(self, image: Image.Image) -> Image.Image:
        """One image -> the 8-bit RGB image_size x image_size image (pad, resize or crop)."""
        cfg = self.config
        size = cfg.image_size
        resample = RESAMPLE[cfg.resample]
        image = image if image.mode == "RGB" else to_rgb(image)
        if cfg.aspect_ratio == "pad":
            if image.width > image.height and resample != Image.Resampling.NEAREST:
                return self._pad_rows_and_resize(image, size, resample)
            return self._expand_to_square(image).resize((size, size), resample=resample)
        if cfg.aspect_ratio == "resize":
            return image.resize((size, size), resample=resample)
        image = self._resize_shortest_edge(image, size, resample)  # crop
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return image.crop((left, top, left + size, top + size))

    def _pad_rows_and_resize(self, image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
        """`_expand_to_square(image).resize((size, size))` for a wide image, bit for bit, with less work.

        Pillow resizes in two passes over 8-bit images: every row horizontally (side -> size), then every
        column vertically. The padding rows of the square are one colour, so their horizontal pass is one
        row, computed once; the content's rows are resized alone (the same coefficients: side -> size).
        The vertical pass then runs on the (size, side) intermediate exactly as inside Pillow's resize.
        Saves the padded square and a quarter of the horizontal pass for 4:3 photos.
        """
        width, height = image.size
        side = width  # wide: the square's side is the width; rows are padded above and below
        top = (side - height) // 2
        pad = self.config.pad_color
        rows = image.resize((size, height), resample=resample)  # the content's horizontal pass
        pad_row = Image.new("RGB", (side, 1), pad).resize((size, 1), resample=resample)
        if pad_row.getextrema() == tuple((c, c) for c in pad):  # the usual case: a constant row stays constant
            middle = Image.new("RGB", (size, side), pad)  # the horizontal pass of the square
            middle.paste(rows, (0, top))
        else:  # Pillow's rounding moved it: the row as computed, repeated
            array = np.empty((side, size, 3), dtype=np.uint8)  # (side, size, 3)
            array[:top] = array[top + height:] = np.asarray(pad_row)
            array[top:top + height] = np.asarray(rows)
            middle = Image.fromarray(array, mode="RGB")
        return middle.resize((size, size), resample=resample)  # the vertical pass

    def _normalise_table(self) -> np.ndarray:
        """(3, 256) float32: the normalised value of each 8-bit level per channel, computed as transformers
        computes every pixel (rescale in float64, cast to float32, subtract the mean and divide by the std in
        float32), so looking a pixel up gives the same float32 bits as computing it."""
        cfg = self.config
        key = (cfg.rescale_factor, cfg.image_mean, cfg.image_std)
        if getattr(self, "_table_key", None) != key:
            levels = torch.arange(256, dtype=torch.float64).expand(3, 256)
            scaled = (levels * cfg.rescale_factor).to(torch.float32)
            mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1)
            std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1)
            self._table = ((scaled - mean) / std).numpy()
            self._table_key = key
        return self._table

    def _normalise_lookups(self) -> list[list[float]]:
        """`_normalise_table` as three lists of 256 floats, as `Image.point` takes a table."""
        table = self._normalise_table()
        if getattr(self, "_lookups_of", None) is not table:
            self._lookups, self._lookups_of = table.tolist(), table
        return self._lookups

    def _pixels_into(self, image: Image.Image, out: np.ndarray) -> None:
        """One image -> its (3, H, W) float32 pixel values written into `out`: the geometry, then the normalisation."""
        self._normalise_into(self._geometry(image), out)

    def _normalise_into(self, image: Image.Image, out: np.ndarray) -> None:
        """An 8-bit RGB image (H, W) -> its normalised (3, H, W) float32 values in `out`: each channel mapped
        through its row of `_normalise_table` by Pillow (`Image.point` to a 32-bit float image: one C lookup per
        pixel, where numpy's `take` first widens every 8-bit index to 64 bits: ~10% less time)."""
        lookups = self._normalise_lookups()
        for channel, band in enumerate(image.split()):
            out[channel] = np.asarray(band.point(lookups[channel], "F"))  # (H, W) float32, the table's bits

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """One image -> (3, H, W) float32. Non-RGB modes are converted with `to_rgb`."""
        size = self.config.image_size
        out = np.empty((3, size, size), dtype=np.float32)
        self._pixels_into(image, out)
        return torch.from_numpy(out)

    def min_decode_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest (width, height) a (width, height) image may be decoded at without upsampling in the
        resize: pad needs the long side, crop the short side, resize both sides >= image_size (as Pillow's
        `Image.draft` reads it: each side at least the returned one)."""
        size = self.config.image_size
        if self.config.aspect_ratio == "resize":
            return size, size
        long_side_wide = width >= height
        if self.config.aspect_ratio == "pad":
            return (size, 1) if long_side_wide else (1, size)
        return (1, size) if long_side_wide else (size, 1)  # crop: the short side

    def load(self, source: str | os.PathLike | bytes | IO[bytes], *, draft: bool = False,
             max_image_pixels: int | None = PIL_DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
        """`load_image(source)`, with `draft=True` a JPEG decoded by libjpeg at the smallest 1/2, 1/4 or 1/8
        scale still at least what this processor's geometry needs (`min_decode_size`).

        Opt-in because the pixels move: measured on photo-like JPEGs (quality 90) to 336 px with CLIP's
        mean/std, 1280x960 decodes at 1/2 and differs from the full decode by max 0.18 / mean 0.005 (pad)
        and max 0.30 / mean 0.009 (crop, resize) in normalised units, 2048x1536 at 1/4 by max 0.19-0.44 /
        mean 0.006-0.011: beyond the 0.0 tolerance of the parity tests with transformers. Load plus
        processing is then 2-3x faster per image. A 640x480 image (no scale fits) decodes exactly as before.
        """
        return load_image(source, max_image_pixels=max_image_pixels,
                          draft=self.min_decode_size if draft else None)

    def _expand_to_square(self, image: Image.Image) -> Image.Image:
        """Pad the short side with the mean colour; content centred (offset rounded down)."""
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        square = Image.new("RGB", (side, side), self.config.pad_color)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square

    @staticmethod
    def _resize_shortest_edge(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
        # The long edge is truncated, not rounded: size * long / short, as transformers'
        # get_resize_output_image_size (int()) -- 41x30 to 32 gives 43x32, not 44x32.
        width, height = image.size
        if width <= height:
            return image.resize((size, size * height // width), resample=resample)
        return image.resize((size * width // height, size), resample=resample)

    # -- construction and serialisation ------------------------------------------------------

    @classmethod
    def from_vision_config(cls, hf_vision_config: Any, aspect_ratio: str = "pad") -> ImageProcessor:
        """Defaults for a CLIP or SigLIP vision tower, chosen by the config's `model_type`.

        Accepts the vision config (`CLIPVisionConfig`, `SiglipVisionConfig`), the full two-tower
        config (`CLIPConfig`, `SiglipConfig`, whose `vision_config` is used), or a dict of either.
        """
        model_type = _field(hf_vision_config, "model_type")
        processor_type = _PROCESSOR_BY_MODEL_TYPE.get(model_type)
        if processor_type is None:
            raise ConfigError(
                f"no image processor defaults for vision config model_type {model_type!r}; supported: "
                f"{sorted(_PROCESSOR_BY_MODEL_TYPE)}. Build ImageProcessor(ImageProcessorConfig(...)) explicitly."
            )
        vision = _field(hf_vision_config, "vision_config") if model_type in ("clip", "siglip") else hf_vision_config
        image_size = _field(vision, "image_size")
        defaults = _PROCESSOR_DEFAULTS[processor_type]
        return cls(ImageProcessorConfig(
            image_size=image_size,
            image_mean=defaults["image_mean"],
            image_std=defaults["image_std"],
            aspect_ratio=aspect_ratio,
            resample=_RESAMPLE_NAME_BY_CODE[defaults["resample"]],
        ))

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageProcessor:
        return cls(ImageProcessorConfig.from_dict(values))

    def to_hf_dict(self) -> dict[str, Any]:
        """The `preprocessor_config.json` content: transformers' format plus `image_aspect_ratio`.

        crop and pad are written as CLIPImageProcessor (shortest edge then centre-crop; for pad the
        caller's image is already square, so the crop is a no-op), resize as SiglipImageProcessor.
        """
        cfg = self.config
        common = {
            "do_resize": True,
            "resample": int(RESAMPLE[cfg.resample]),
            "do_rescale": True,
            "rescale_factor": cfg.rescale_factor,
            "do_normalize": True,
            "image_mean": list(cfg.image_mean),
            "image_std": list(cfg.image_std),
            "do_convert_rgb": True,
            "image_aspect_ratio": cfg.aspect_ratio,
        }
        if cfg.aspect_ratio == "resize":
            return {"image_processor_type": "SiglipImageProcessor", **common,
                    "size": {"height": cfg.image_size, "width": cfg.image_size}, "do_center_crop": False}
        return {"image_processor_type": "CLIPImageProcessor", **common,
                "size": {"shortest_edge": cfg.image_size}, "do_center_crop": True,
                "crop_size": {"height": cfg.image_size, "width": cfg.image_size}}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `<folder>/preprocessor_config.json`; returns its path."""
        path = Path(folder) / PREPROCESSOR_CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, folder_or_hub_id: str | os.PathLike, *, cache_dir: str | None = None) -> ImageProcessor:
        """Read `preprocessor_config.json` from a folder or a Hub model id (via the Hub cache: `cache_dir` when
        given, else the default one)."""
        folder = Path(folder_or_hub_id)
        if folder.is_dir():
            path = folder / PREPROCESSOR_CONFIG_NAME
            if not path.is_file():
                raise MissingPathError(f"no {PREPROCESSOR_CONFIG_NAME} in folder '{folder}'")
        else:
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(str(folder_or_hub_id), PREPROCESSOR_CONFIG_NAME, cache_dir=cache_dir))
            except Exception as exc:
                raise MissingPathError(
                    f"'{folder_or_hub_id}' is neither a folder nor a Hub model id whose "
                    f"{PREPROCESSOR_CONFIG_NAME} could be fetched ({type(exc).__name__}: {exc})"
                ) from exc
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read '{path}': {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"'{path}' must hold a JSON object, got {type(values).__name__}")
        try:
            return cls(config_from_hf_dict(values, source=str(path)))
        except (ValueError, TypeError) as exc:
            message = str(exc)
            raise ConfigError(message if str(path) in message else f"{path}: {message}") from None

    def check_fits(self, image_size: int, source: str = "the image processor") -> None:
        """ConfigError naming `source` when this processor's images are not the `image_size` the vision tower
        takes (its position table has one row per patch of that size; another size fails deep in the tower)."""
        if self.config.image_size != image_size:
            raise ConfigError(
                f"{source} makes {self.config.image_size}x{self.config.image_size} images but the vision tower takes "
                f"{image_size}x{image_size}; set its size and crop_size to {image_size} (or delete it to use the "
                "tower's defaults)"
            )


def _field(config: Any, key: str) -> Any:
    """`config.key` for a transformers config, `config[key]` for its dict form; None when absent."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _square_side(size: Any, what: str, source: str) -> int:
    """A {"height": n, "width": n} (or int) size -> n; anything non-square is refused."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and set(size) == {"height", "width"} and size["height"] == size["width"]:
        return size["height"]
    raise ConfigError(f"{source}: {what} {size!r} is not a square; ImageProcessorConfig makes square images only")


def config_from_hf_dict(values: dict[str, Any], source: str = "preprocessor_config.json") -> ImageProcessorConfig:
    """Interpret a transformers image-processor dict (CLIP, SigLIP, LLaVA, or ours) as our config.

    Keys a class's JSON leaves out take that class's defaults. Geometries we cannot reproduce exactly
    (non-square output, shortest edge larger than the crop, no resize) raise ValueError.
    """
    kind = values.get("image_processor_type") or values.get("feature_extractor_type") or ""
    kind = kind.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast").removesuffix("Pil")
    defaults = _PROCESSOR_DEFAULTS.get(kind, {})

    def get(key: str) -> Any:
        if key in values:
            return values[key]
        if key in defaults:
            return defaults[key]
        raise ConfigError(f"{source}: no '{key}' and no default known for image_processor_type {kind!r}")

    if values.get("do_resize", True) is not True:
        raise ConfigError(f"{source}: do_resize={values['do_resize']!r} is not supported; images are always resized")
    size = get("size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if isinstance(size, int):  # both CLIP and SigLIP read a bare int as the shortest edge
        size = {"shortest_edge": size}
    center_crop = bool(values.get("do_center_crop", defaults.get("do_center_crop", False)))
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        if not center_crop:
            raise ConfigError(f"{source}: size {size} without do_center_crop gives non-square images; not supported")
        image_size = _square_side(get("crop_size"), "crop_size", source)
        if image_size != size["shortest_edge"]:
            raise ConfigError(
                f"{source}: resizing the shortest edge to {size['shortest_edge']} then cropping {image_size} "
                "is not supported; the two must be equal"
            )
        aspect_ratio = "crop"
    else:
        image_size = _square_side(size, "size", source)
        if center_crop and _square_side(get("crop_size"), "crop_size", source) != image_size:
            raise ConfigError(f"{source}: crop_size {values.get('crop_size')} differs from size {size}; not supported")
        aspect_ratio = "resize"
    if values.get("do_pad"):
        if kind != "LlavaImageProcessor":
            raise ConfigError(f"{source}: do_pad=True of {kind or 'an unknown processor'} is not supported")
        aspect_ratio = "pad"
    aspect_ratio = values.get("image_aspect_ratio", aspect_ratio)

    resample = get("resample")
    if isinstance(resample, int) and not isinstance(resample, bool):
        if resample not in _RESAMPLE_NAME_BY_CODE:
            raise ConfigError(f"{source}: unknown PIL resample code {resample}; known: {_RESAMPLE_NAME_BY_CODE}")
        resample = _RESAMPLE_NAME_BY_CODE[resample]
    normalize = values.get("do_normalize", True)
    return ImageProcessorConfig(
        image_size=image_size,
        image_mean=get("image_mean") if normalize else (0.0, 0.0, 0.0),
        image_std=get("image_std") if normalize else (1.0, 1.0, 1.0),
        aspect_ratio=aspect_ratio,
        resample=resample,
        rescale_factor=values.get("rescale_factor", 1 / 255) if values.get("do_rescale", True) else 1.0,
    )
