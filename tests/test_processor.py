"""vlm.visual.processor: loading files safely and matching transformers' image processors numerically.

Every image is made here with PIL. The references are transformers' PIL-backend processors
(`CLIPImageProcessorPil`, `SiglipImageProcessorPil`, `LlavaImageProcessorPil`): what `CLIPImageProcessor`
resolves to without torchvision, and the slow, exact path with it. Measured max abs difference
against them: 0.0 (bit-identical), so the tolerance is 0.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, SiglipConfig, SiglipVisionConfig
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

import vlm.visual.processor as processor_module
from vlm.visual.processor import (
    ImageLoadError,
    ImageProcessor,
    ImageProcessorConfig,
    load_image,
    to_rgb,
)

PARITY_TOLERANCE = 0.0  # measured: identical float32 values (same PIL resize, same float64->float32 ops)
SIZE = 32
# 41x30 -> shortest edge 32 gives 43x32 under transformers' truncation; rounding would give 44x32.
SHAPES = [(41, 30), (30, 41), (40, 40), (SIZE, SIZE), (17, 9)]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def reference(processor, image) -> torch.Tensor:
    """pixel_values as LLaVA and transformers' users ask any image processor for them (ours included)."""
    return processor(image, return_tensors="pt")["pixel_values"]


def ours(aspect_ratio: str, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, **kwargs) -> ImageProcessor:
    return ImageProcessor(ImageProcessorConfig(SIZE, tuple(mean), tuple(std), aspect_ratio=aspect_ratio, **kwargs))


def clip_pil() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


def theirs_for(aspect_ratio: str):
    """transformers' processor with the geometry of ours(aspect_ratio) and CLIP's mean/std."""
    if aspect_ratio == "resize":
        return SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=OPENAI_CLIP_MEAN,
                                       image_std=OPENAI_CLIP_STD)
    if aspect_ratio == "pad":
        return LlavaImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                      do_pad=True)
    return clip_pil()


# -- parity with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("width,height", SHAPES)
def test_crop_matches_clip_image_processor(width, height):
    image = noise(width, height)
    expected = reference(clip_pil(), image)
    got = reference(ours("crop"), image)
    assert got.shape == expected.shape == (1, 3, SIZE, SIZE) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= PARITY_TOLERANCE


@pytest.mark.parametrize("width,height", SHAPES)
def test_resize_matches_siglip_image_processor(width, height):
    siglip = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    image = noise(width, height, seed=1)
    expected = reference(siglip, image)
    got = reference(ours("resize", IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD), image)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= PARITY_TOLERANCE


@pytest.mark.parametrize("width,height", [(41, 30), (30, 41), (50, 21)])
@pytest.mark.parametrize("mean,std", [(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), ((0.2, 0.4, 0.6), (0.25, 0.3, 0.35))])
def test_pad_matches_llava_image_processor(width, height, mean, std):
    """LlavaImageProcessor(do_pad=True) pads with int(mean * 255) as LLaVA-1.5 does; CLIP's mean gives
    (122, 116, 104), which rounding would make (123, 117, 104): one grey level on the whole border."""
    llava = LlavaImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
        do_pad=True, image_mean=mean, image_std=std,
    )
    image = noise(width, height, seed=2)
    got = reference(ours("pad", mean, std), image)
    assert got.shape == (1, 3, SIZE, SIZE)
    assert (got - reference(llava, image)).abs().max().item() <= PARITY_TOLERANCE


def llava_expand_to_square(image: Image.Image, mean) -> Image.Image:
    """LLaVA-1.5's `expand2square` (llava/mm_utils.py) with the fill its training and eval code pass,
    `tuple(int(x * 255) for x in image_processor.image_mean)`: the image pasted centred (offsets
    rounded down) on a square of the longer side."""
    side = max(image.size)
    square = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in mean))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


@pytest.mark.parametrize("width,height", [(41, 30), (30, 41), (40, 40)])
def test_pad_matches_llava_expand_to_square_then_clip_preprocess(width, height):
    """LLaVA's pad path: expand2square in the mean colour, then
    `image_processor.preprocess(image, return_tensors="pt")["pixel_values"]` of its CLIP processor."""
    image = noise(width, height, seed=6)
    clip = clip_pil()
    expected = clip.preprocess(llava_expand_to_square(image, clip.image_mean), return_tensors="pt")["pixel_values"]
    processor = ours("pad")
    assert processor.config.pad_color == (122, 116, 104)
    got = processor.preprocess(image, return_tensors="pt")["pixel_values"]
    assert got.shape == (1, 3, SIZE, SIZE)
    assert (got - expected).abs().max().item() <= PARITY_TOLERANCE


def test_llava_pad_path_run_with_our_processor_gives_our_pixels():
    """LLaVA's code handed our processor: it reads image_mean and crop_size, pads, then calls preprocess."""
    processor = ours("pad")
    image = noise(41, 30, seed=12)
    assert processor.crop_size == {"height": SIZE, "width": SIZE} and processor.image_std == list(OPENAI_CLIP_STD)
    llava_way = processor.preprocess(llava_expand_to_square(image, processor.image_mean), return_tensors="pt")
    assert torch.equal(llava_way["pixel_values"], reference(processor, image))


def test_non_rgb_input_is_converted_as_transformers_does():
    rgba = noise(41, 30, seed=5).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(41, dtype=np.uint8) * 6, (30, 1))))
    assert (reference(ours("crop"), rgba) - reference(clip_pil(), rgba)).abs().max().item() <= PARITY_TOLERANCE


# -- the transformers calling convention -------------------------------------------------------


@pytest.mark.parametrize("aspect_ratio", ["crop", "resize", "pad"])
def test_called_the_transformers_way_returns_what_transformers_returns(aspect_ratio):
    """`__call__` and `preprocess`, one image or a list, return_tensors "pt" / "np" / None: the same
    container types, shapes and values as transformers' processor of the same geometry."""
    from transformers import BatchFeature

    processor, theirs = ours(aspect_ratio), theirs_for(aspect_ratio)
    images = [noise(41, 30, seed=7), noise(30, 41, seed=8), noise(17, 9, seed=9)]
    for call in ("__call__", "preprocess"):
        for given in (images, images[0]):
            mine = getattr(processor, call)(given, return_tensors="pt")
            expected = getattr(theirs, call)(given, return_tensors="pt")
            assert isinstance(mine, BatchFeature) and list(mine.keys()) == ["pixel_values"]
            assert torch.equal(mine.pixel_values, mine["pixel_values"])  # attribute access too
            assert mine["pixel_values"].dtype == expected["pixel_values"].dtype == torch.float32
            assert mine["pixel_values"].shape == expected["pixel_values"].shape
            assert (mine["pixel_values"] - expected["pixel_values"]).abs().max().item() <= PARITY_TOLERANCE
    keyword = processor(images=images, return_tensors="pt")["pixel_values"]  # as LlavaProcessor calls it
    assert torch.equal(keyword, reference(processor, images))

    as_np, theirs_np = processor(images, return_tensors="np")["pixel_values"], theirs(images, return_tensors="np")["pixel_values"]
    assert isinstance(as_np, np.ndarray) and as_np.dtype == theirs_np.dtype and np.array_equal(as_np, theirs_np)
    as_list, theirs_list = processor(images)["pixel_values"], theirs(images)["pixel_values"]  # default None
    assert isinstance(as_list, list) and len(as_list) == len(theirs_list) == 3
    for mine_one, theirs_one in zip(as_list, theirs_list):
        assert type(mine_one) is type(theirs_one) is np.ndarray and mine_one.dtype == theirs_one.dtype
        assert np.array_equal(mine_one, theirs_one)


def test_uint8_arrays_and_tensors_are_read_as_transformers_reads_them():
    picture = np.array(noise(41, 30, seed=10))  # (H, W, 3) uint8, writable
    processor, clip = ours("crop"), clip_pil()
    for given in (picture, picture.transpose(2, 0, 1), torch.from_numpy(picture),
                  [picture, np.asarray(noise(30, 41, seed=11))], np.stack([picture, picture[::-1]])):
        got, expected = reference(processor, given), reference(clip, given)
        assert got.shape == expected.shape and (got - expected).abs().max().item() <= PARITY_TOLERANCE
    assert torch.equal(reference(processor, picture), reference(processor, Image.fromarray(picture)))


def test_batch_stacks_single_image_results_and_bad_input_is_named():
    processor = ours("crop")
    images = [noise(41, 30), noise(30, 41, seed=3)]
    batch = reference(processor, images)
    assert batch.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(batch[1:], reference(processor, images[1]))
    with pytest.raises(ValueError, match="empty"):
        processor([])
    with pytest.raises(TypeError, match="image 1 is a str"):
        processor([images[0], "cat.jpg"])
    with pytest.raises(TypeError, match="got str .*load_image"):
        processor("cat.jpg")
    with pytest.raises(TypeError, match="image 0 is an array of dtype float32; only uint8"):
        processor(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(TypeError, match=r"image 0 has shape \(8, 8, 5\)"):
        processor(np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="return_tensors='tf' is not supported"):
        processor(images, return_tensors="tf")
    with pytest.raises(TypeError, match=r"does not take \['do_pad'\]"):
        processor(images, return_tensors="pt", do_pad=False)


# -- pad geometry ------------------------------------------------------------------------------


def test_pad_fills_border_with_mean_colour_and_centres_content():
    processor = ours("pad")
    assert processor.config.pad_color == (122, 116, 104)  # int(OPENAI_CLIP_MEAN * 255), as LLaVA
    white = Image.new("RGB", (64, 32), (255, 255, 255))  # wide: bands above and below
    pixels = reference(processor, white)[0]  # (3, 32, 32): content rows 8..23
    band = 1 / 255 / min(OPENAI_CLIP_STD)  # one grey level, normalised
    # rows 6 and 25 are within reach of the bicubic kernel's overshoot at the edges of the content
    assert pixels[:, :6].abs().max().item() < band and pixels[:, 26:].abs().max().item() < band
    content_rows = (pixels.min(dim=0).values.min(dim=1).values > 1.5).nonzero().flatten().tolist()
    assert content_rows == list(range(8, 24))  # 16 rows, 8 above and 8 below
    # symmetric about the horizontal centre line, so the content is centred
    assert torch.allclose(pixels, pixels.flip(1), atol=1e-6)
    tall = reference(processor, Image.new("RGB", (32, 64), (255, 255, 255)))[0]
    assert torch.allclose(tall, pixels.transpose(1, 2), atol=1e-6)


# -- load_image --------------------------------------------------------------------------------


def save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(image, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (20, 40)
    # rotating clockwise brings the stored left edge to the top
    top, bottom = loaded.getpixel((10, 5)), loaded.getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_rgba_transparent_pixel_becomes_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (255, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 0, 128))
    loaded = load_image(save(image, tmp_path / "a.png"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) in {(127, 127, 127), (126, 126, 126)}
    assert loaded.getpixel((2, 2)) == (255, 0, 0)


def test_palette_with_transparency_and_la(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    loaded = load_image(save(palette, tmp_path / "p.png", transparency=0))
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((3, 3)) == (0, 255, 0)
    gray_alpha = Image.merge("LA", (Image.new("L", (2, 2), 10), Image.new("L", (2, 2), 0)))
    assert load_image(save(gray_alpha, tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)
    rgb_key = Image.new("RGB", (2, 2), (10, 20, 30))  # tRNS colour key on a truecolour PNG
    rgb_key.putpixel((0, 0), (200, 0, 0))
    loaded = load_image(save(rgb_key, tmp_path / "key.png", transparency=(200, 0, 0)))
    assert loaded.getpixel((0, 0)) == (255, 255, 255) and loaded.getpixel((1, 1)) == (10, 20, 30)


def test_cmyk_gray_and_16_bit_convert_to_sensible_rgb(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    assert load_image(save(cmyk, tmp_path / "c.tif")).getpixel((0, 0)) == (255, 0, 0)
    gray = Image.new("L", (4, 4), 128)
    assert load_image(save(gray, tmp_path / "l.png")).getpixel((0, 0)) == (128, 128, 128)
    deep = Image.fromarray(np.array([[0, 32896], [65535, 16448]], dtype=np.uint16))
    assert deep.mode == "I;16"
    loaded = load_image(save(deep, tmp_path / "16.png"))
    assert [loaded.getpixel(xy)[0] for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 128, 255, 64]
    assert len(set(loaded.getpixel((1, 0)))) == 1  # gray stays gray
    bilevel = Image.new("1", (2, 2), 1)
    assert load_image(save(bilevel, tmp_path / "1.png")).getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_premultiplied_and_deep_modes():
    premultiplied = Image.new("La", (2, 2), (0, 0))  # fully transparent
    assert to_rgb(premultiplied).getpixel((0, 0)) == (255, 255, 255)
    as_int = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert as_int.mode == "I" and to_rgb(as_int).getpixel((1, 0)) == (255, 255, 255)
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [to_rgb(floats).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_multi_frame_gif_takes_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 3
    assert load_image(path).getpixel((4, 4)) == (255, 0, 0)


def test_bytes_and_file_objects_are_accepted(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (3, 2)
    buffer.seek(0)
    assert load_image(buffer).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(TypeError, match="int"):
        load_image(42)


def test_decompression_limit_is_strict_configurable_and_local(tmp_path):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "big.png")  # 10_000 pixels
    before = Image.MAX_IMAGE_PIXELS
    # 4_000: Pillow itself raises (more than twice its limit); 8_000: Pillow would only warn.
    for limit in (4_000, 8_000):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with pytest.raises(ValueError) as info:
                load_image(path, max_image_pixels=limit)
        message = str(info.value)
        assert "big.png" in message and "10000 pixels" in message and f"max_image_pixels={limit}" in message
        assert Image.MAX_IMAGE_PIXELS == before
    assert load_image(path, max_image_pixels=10_000).size == (100, 100)
    assert load_image(path, max_image_pixels=None).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == before


def test_truncated_and_corrupt_files_raise_image_load_error(tmp_path):
    buffer = io.BytesIO()
    noise(64, 64).save(buffer, format="JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg.*truncated") as info:
        load_image(path)
    assert isinstance(info.value, ValueError) and info.value.source == str(path)
    garbage = tmp_path / "notes.jpg"
    garbage.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        load_image(garbage)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")


# -- config, construction, serialisation ------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("image_size", 0), ("image_mean", (0.5, 0.5)), ("image_std", (0.5, 0.0, 0.5)), ("aspect_ratio", "square"),
     ("resample", "cubic"), ("rescale_factor", -1.0)],
)
def test_config_errors_name_the_field(field, value):
    values = {"image_size": 8, "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3, field: value}
    with pytest.raises(ValueError, match=field):
        ImageProcessorConfig(**values)


def test_our_constants_equal_transformers():
    assert processor_module.OPENAI_CLIP_MEAN == tuple(OPENAI_CLIP_MEAN)
    assert processor_module.OPENAI_CLIP_STD == tuple(OPENAI_CLIP_STD)
    assert processor_module.SIGLIP_MEAN == tuple(IMAGENET_STANDARD_MEAN)
    assert processor_module.SIGLIP_STD == tuple(IMAGENET_STANDARD_STD)


def test_from_vision_config_chooses_by_model_type():
    clip = ImageProcessor.from_vision_config(CLIPVisionConfig(image_size=48), aspect_ratio="crop").config
    assert (clip.image_size, clip.aspect_ratio, clip.resample) == (48, "crop", "bicubic")
    siglip = ImageProcessor.from_vision_config(SiglipVisionConfig(image_size=64)).config
    assert (siglip.image_size, siglip.image_mean, siglip.image_std) == (64, (0.5,) * 3, (0.5,) * 3)
    full = ImageProcessor.from_vision_config(SiglipConfig(vision_config={"image_size": 40}))
    assert full.config.image_size == 40 and full.config.image_mean == (0.5,) * 3
    from_dict = ImageProcessor.from_vision_config({"model_type": "clip_vision_model", "image_size": 16})
    assert from_dict.config.image_mean == tuple(OPENAI_CLIP_MEAN)
    with pytest.raises(ValueError, match="'dinov2'"):
        ImageProcessor.from_vision_config({"model_type": "dinov2", "image_size": 16})


def test_to_dict_round_trip_is_json_safe():
    processor = ours("pad", resample="bilinear")
    values = json.loads(json.dumps(processor.to_dict()))
    assert ImageProcessor.from_dict(values).config == processor.config
    with pytest.raises(ValueError, match="unknown.*'size'"):
        ImageProcessor.from_dict({**values, "size": 3})


@pytest.mark.parametrize("aspect_ratio", ["pad", "crop", "resize"])
def test_save_pretrained_round_trip_and_transformers_loads_it(tmp_path, aspect_ratio):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    processor = ours(aspect_ratio, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), resample="bilinear")
    processor.save_pretrained(tmp_path)
    assert ImageProcessor.from_pretrained(tmp_path).config == processor.config
    theirs_class = SiglipImageProcessor if aspect_ratio == "resize" else CLIPImageProcessor
    theirs = theirs_class.from_pretrained(tmp_path)
    image = noise(41, 30, seed=4)
    # transformers does not pad: hand it the square our pad step makes; same geometry from there on
    given = processor._expand_to_square(image) if aspect_ratio == "pad" else image
    assert (reference(processor, image) - reference(theirs, given)).abs().max().item() <= PARITY_TOLERANCE


def test_from_pretrained_reads_transformers_files(tmp_path):
    clip_dir, siglip_dir = tmp_path / "clip", tmp_path / "siglip"
    CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(clip_dir)
    SiglipImageProcessorPil(size={"height": 20, "width": 20}, resample=2).save_pretrained(siglip_dir)
    clip = ImageProcessor.from_pretrained(clip_dir).config
    assert (clip.image_size, clip.aspect_ratio, clip.resample) == (24, "crop", "bicubic")
    assert clip.image_mean == tuple(OPENAI_CLIP_MEAN)
    siglip = ImageProcessor.from_pretrained(siglip_dir).config
    assert (siglip.image_size, siglip.aspect_ratio, siglip.resample) == (20, "resize", "bilinear")
    assert siglip.image_std == (0.5,) * 3


def test_from_pretrained_reads_old_int_sizes_and_refuses_unrepresentable(tmp_path):
    old = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 24, "crop_size": 24, "do_center_crop": True,
           "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old))
    config = ImageProcessor.from_pretrained(tmp_path).config
    assert (config.image_size, config.aspect_ratio) == (24, "crop")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**old, "size": 28}))
    with pytest.raises(ValueError, match="shortest edge to 28 then cropping 24"):
        ImageProcessor.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json in folder .*empty"):
        ImageProcessor.from_pretrained(empty)


def test_user_mistakes_are_vlm_errors(tmp_path):
    """vlm.errors policy: a bad image-processor config is a ConfigError, a missing file or folder a
    MissingPathError, an undecodable image a UserError (ImageLoadError); all still ValueErrors."""
    from transformers import CLIPVisionModel

    from vlm.errors import ConfigError, MissingPathError, UserError
    from vlm.visual.processor import ImageLoadError, ImageProcessor, ImageProcessorConfig, load_image
    from vlm.visual.tower import VisionTower

    with pytest.raises(ConfigError, match="image_std must be > 0"):
        ImageProcessorConfig(image_size=16, image_mean=(0.5,) * 3, image_std=(0.0, 0.5, 0.5))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor",
                                                                    "size": {"height": 16, "width": 32}}))
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match="no preprocessor_config.json in folder"):
        ImageProcessor.from_pretrained(tmp_path / "empty")
    with pytest.raises(MissingPathError, match="image file not found: .*nowhere.png"):
        load_image(tmp_path / "nowhere.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "bad.png")
    assert isinstance(info.value, UserError)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=16, patch_size=8))
    with pytest.raises(ConfigError, match="mm_vision_select_layer=5 is out of range"):
        VisionTower(tower, select_layer=5)
    with pytest.raises(ConfigError, match="mm_vision_select_feature"):
        VisionTower(tower, select_feature="cls")


# -- the faster paths: same pixels, or opt-in ---------------------------------------------------


@pytest.mark.parametrize("resample", sorted(processor_module.RESAMPLE))
@pytest.mark.parametrize("width,height,size", [(41, 30, 32), (640, 480, 336), (337, 100, 336), (33, 32, 32),
                                               (300, 3, 16), (336, 200, 336)])
def test_wide_pad_fast_path_is_pillows_square_resize_bit_for_bit(resample, width, height, size):
    """A wide image's padding rows are resized once, its content alone (`_pad_rows_and_resize`): the result
    is what resizing the padded square gives, for every filter."""
    processor = ImageProcessor(ImageProcessorConfig(size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resample=resample))
    image = noise(width, height, seed=width)
    expected = processor._expand_to_square(image).resize((size, size), resample=processor_module.RESAMPLE[resample])
    assert np.array_equal(np.asarray(processor._geometry(image)), np.asarray(expected))


def test_every_8_bit_level_normalises_to_transformers_float32_bits():
    """The lookup table (`_normalise_table`) against transformers' arithmetic on all 256 levels per channel."""
    levels = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([levels, levels[::-1], np.roll(levels, 7)], axis=-1)[None].repeat(4, axis=0))
    mean, std = (0.2, 0.4, 0.6), (0.25, 0.3, 0.35)
    siglip = SiglipImageProcessorPil(size={"height": 4, "width": 256}, image_mean=mean, image_std=std)
    expected = siglip(image, return_tensors="pt")["pixel_values"]
    table = ImageProcessor(ImageProcessorConfig(256, mean, std))._normalise_table()  # (3, 256)
    got = torch.from_numpy(np.stack([table[c][np.asarray(image)[..., c]] for c in range(3)]))[None]
    assert got.shape == expected.shape == (1, 3, 4, 256)
    assert torch.equal(got, expected)


def photo_jpeg(path, width: int, height: int, **kwargs) -> None:
    """A smooth, photo-like JPEG (quality 90): blurred colour fields, discs, mild noise."""
    rng = np.random.default_rng(width * height)
    image = Image.fromarray(rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image).astype(float) + rng.normal(0, 4, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90, **kwargs)


def test_min_decode_size_follows_the_geometry():
    def processor(aspect_ratio):
        return ImageProcessor(ImageProcessorConfig(336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect_ratio=aspect_ratio))
    assert processor("pad").min_decode_size(1280, 960) == (336, 1)  # the padded square's side: the long side
    assert processor("pad").min_decode_size(960, 1280) == (1, 336)
    assert processor("crop").min_decode_size(1280, 960) == (1, 336)  # the short side
    assert processor("crop").min_decode_size(960, 1280) == (336, 1)
    assert processor("resize").min_decode_size(1280, 960) == (336, 336)


def test_jpeg_draft_is_opt_in_scales_to_at_least_the_size_needed_and_moves_pixels_a_little(tmp_path):
    big, small, png = tmp_path / "big.jpg", tmp_path / "small.jpg", tmp_path / "big.png"
    photo_jpeg(big, 1280, 960)
    photo_jpeg(small, 640, 480)
    load_image(big).save(png)
    pad = ImageProcessor(ImageProcessorConfig(336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect_ratio="pad"))
    crop = ImageProcessor(ImageProcessorConfig(300, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect_ratio="crop"))
    assert pad.load(big).size == (1280, 960)  # off by default
    assert pad.load(big, draft=True).size == (640, 480)  # 1/2: the long side 640 >= 336; 1/4 would be 320
    assert crop.load(big, draft=True).size == (640, 480)  # the short side 480 >= 300; 1/4 gives 240
    assert pad.load(png, draft=True).size == (1280, 960)  # not a JPEG: decoded whole
    # no scale fits: the very same pixels
    assert np.array_equal(np.asarray(pad.load(small, draft=True)), np.asarray(load_image(small)))
    full = reference(pad, pad.load(big))
    drafted = reference(pad, pad.load(big, draft=True))
    difference = (drafted - full).abs()
    # measured 0.18 max / 0.005 mean (ImageProcessor.load): not the parity tests' 0.0, hence opt-in
    assert 0 < difference.max().item() < 0.4 and difference.mean().item() < 0.02


def test_jpeg_draft_keeps_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    photo_jpeg(path, 1280, 960, exif=exif)
    pad = ImageProcessor(ImageProcessorConfig(336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect_ratio="pad"))
    assert load_image(path).size == (960, 1280)
    assert pad.load(path, draft=True).size == (480, 640)
