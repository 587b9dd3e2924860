"""The synthetic shapes set for the demo: small pictures of coloured shapes and one-word questions about them.

Design choices:
- A scene is 1..`max_shapes` filled shapes with non-overlapping bounding boxes on a white background,
  drawn with PIL `ImageDraw` (thousands of images per second). The scene list is written into each
  record (`"shapes"`) so answers can be re-derived and checked against the picture.
- Every question's answer is one lowercase word (`red`, `circle`, `2`, `yes`) so evaluation is exact
  match. Questions are only asked when unambiguous: "What color is the circle?" only when exactly one
  circle is present, "What shape is the red object?" only when exactly one red shape is.
- Question types are kept balanced (each image asks the least-used types that apply to it), and
  existence questions alternate yes/no, so a blind model cannot beat chance by answering "yes".
- Each image has its own random stream seeded by (seed, split, index): the same seed gives the same
  bytes, and eval images do not change when `n_train` does. Train and eval are split by image
  (`train_*.png`, `eval_*.png`), so no eval picture is seen in training.
- Output is LLaVA JSON (`train.json`, `eval.json`, images under `images/`, paths relative to it).
- `complete.json` is written last, with the settings the set was made from: a set without it (an
  interrupted generation) is never reused; with `reuse=True` a complete set made from the same
  settings, every file present, is returned as it is instead of being drawn again.
- Preference pairs (`write_preference_pairs`, `vlm data synth --preference`) are made from a split's
  questions as they are: chosen = the true answer, rejected = a plausible wrong one of the same kind,
  taken from the picture when it can be (the colour of another shape in it, another shape kind in it:
  the binding mistake a half-trained model makes), else another palette colour / kind / count, and for
  yes/no the other word. LLaVA-style preference records (`conversations` up to the question, then
  `chosen` and `rejected`) in `{split}_preference.json`, beside the split they come from.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from vlm.errors import ConfigError

DEFAULT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
}
DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists")
BACKGROUND = (255, 255, 255)
COMPLETE_MARKER = "complete.json"


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, colour name and bounding box (x0, y0, x1, y1), inclusive pixel bounds."""

    kind: str
    color: str
    box: tuple[int, int, int, int]

    def inside_point(self) -> tuple[int, int]:
        """A pixel certainly inside the drawn shape (the centroid for triangles)."""
        x0, y0, x1, y1 = self.box
        if self.kind == "triangle":  # apex at the top middle, base at the bottom
            return (x0 + x1) // 2, y0 + 2 * (y1 - y0) // 3
        return (x0 + x1) // 2, (y0 + y1) // 2


def make_scene(
    rng: random.Random,
    *,
    image_size: int,
    colors: Sequence[str],
    shapes: Sequence[str],
    max_shapes: int,
    size_range: tuple[float, float] = (0.22, 0.4),
    gap: int = 2,
    grid: int | None = None,
) -> list[Shape]:
    """1..max_shapes shapes with random kind, colour, size and non-overlapping boxes.

    With `grid=g` the picture is a g x g grid of cells and each shape lies centred in its own random
    cell, at a random size (60-100% of the cell, less a margin): a layout where a vision tower whose
    patches are the cells sees each shape whole in one token, so a tiny model learns it in minutes.
    """
    count = rng.randint(1, max_shapes)
    if grid is not None:
        cell = image_size // grid
        placed = []
        for slot in rng.sample(range(grid * grid), count):
            side = rng.randint(max(4, round(0.6 * (cell - 2))), cell - 2)
            x0 = (slot % grid) * cell + (cell - side) // 2  # centred in its cell
            y0 = (slot // grid) * cell + (cell - side) // 2
            placed.append(Shape(rng.choice(list(shapes)), rng.choice(list(colors)), (x0, y0, x0 + side - 1, y0 + side - 1)))
        return placed
    low = max(6, round(size_range[0] * image_size))
    high = max(low, round(size_range[1] * image_size))
    placed: list[Shape] = []
    for _ in range(count):
        kind, color = rng.choice(list(shapes)), rng.choice(list(colors))
        for attempt in range(200):
            side = rng.randint(low, high) if attempt < 100 else low
            x0, y0 = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if all(_apart(box, other.box, gap) for other in placed):
                placed.append(Shape(kind, color, box))
                break
    return placed


def render_scene(scene: list[Shape], image_size: int, palette: dict[str, tuple[int, int, int]]) -> Image.Image:
    """Draw `scene` on a white RGB square."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene:
        fill = palette[shape.color]
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            draw.ellipse(shape.box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(shape.box, fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown shape kind {shape.kind!r}; known: circle, square, triangle")
    return image


def applicable_question_types(scene: list[Shape]) -> list[str]:
    """The question types that have an unambiguous question for `scene`."""
    kinds = [s.kind for s in scene]
    colors = [s.color for s in scene]
    types = []
    if any(kinds.count(k) == 1 for k in kinds):
        types.append("color")
    if any(colors.count(c) == 1 for c in colors):
        types.append("shape")
    return types + ["count", "exists"]


def ask(
    scene: list[Shape], question_type: str, rng: random.Random, *, colors: Sequence[str], shapes: Sequence[str], want_yes: bool
) -> tuple[str, str]:
    """(question, one-word answer) of `question_type` about `scene`."""
    kinds = [s.kind for s in scene]
    hues = [s.color for s in scene]
    if question_type == "color":
        target = rng.choice([s for s in scene if kinds.count(s.kind) == 1])
        return f"What color is the {target.kind}?", target.color
    if question_type == "shape":
        target = rng.choice([s for s in scene if hues.count(s.color) == 1])
        return f"What shape is the {target.color} object?", target.kind
    if question_type == "count":
        return "How many shapes are there?", str(len(scene))
    if question_type == "exists":
        present = sorted({(s.color, s.kind) for s in scene})
        absent = [(c, k) for c in colors for k in shapes if (c, k) not in present]
        color, kind = rng.choice(present if want_yes or not absent else absent)
        return f"Is there a {color} {kind}?", "yes" if (color, kind) in present else "no"
    raise ConfigError(f"unknown question type {question_type!r}; known: {QUESTION_TYPES}")


def generate_shapes_dataset(
    out_dir: str | Path,
    *,
    n_train: int,
    n_eval: int,
    image_size: int = 64,
    seed: int = 0,
    questions_per_image: int = 2,
    colors: dict[str, tuple[int, int, int]] | None = None,
    shapes: Sequence[str] = DEFAULT_SHAPES,
    max_shapes: int = 3,
    question_types: Sequence[str] = QUESTION_TYPES,
    grid: int | None = None,
    reuse: bool = False,
    progress: bool = True,
) -> dict:
    """Write `out_dir/images/{train,eval}_NNNNN.png`, `out_dir/train.json`, `out_dir/eval.json`, then
    `out_dir/complete.json`.

    Args:
        n_train, n_eval: number of images per split (each gives up to `questions_per_image` samples).
        colors: colour name -> RGB; default red, green, blue, yellow.
        shapes: shape kinds among circle, square, triangle.
        max_shapes: most shapes per picture (at least 1).
        question_types: subset of color, shape, count, exists.
        grid: place each shape in its own cell of a grid x grid layout (see `make_scene`).
        reuse: return a complete set already in `out_dir` made from the same settings instead of
            drawing it again (`"reused": True` in the result).
        progress: a progress bar per split on stderr.

    Returns:
        `{"image_folder", "train", "eval", "n_train_images", "n_eval_images", "n_train_samples",
        "n_eval_samples", "question_types": {split: {type: count}}, "reused": bool}` (paths as strings).
    """
    palette = dict(DEFAULT_COLORS if colors is None else colors)
    _check_options(n_train, n_eval, image_size, questions_per_image, palette, shapes, max_shapes, question_types)
    if grid is not None and (grid * grid < max_shapes or image_size // grid < 8):
        raise ConfigError(f"grid={grid}: needs grid*grid >= max_shapes ({max_shapes}) and cells of at least 8 px "
                         f"(image_size {image_size} // grid = {image_size // max(grid, 1)})")
    settings = {"n_train": n_train, "n_eval": n_eval, "image_size": image_size, "seed": seed,
                "questions_per_image": questions_per_image, "colors": {k: list(v) for k, v in palette.items()},
                "shapes": list(shapes), "max_shapes": max_shapes, "question_types": list(question_types), "grid": grid}
    out = Path(out_dir)
    if reuse:
        summary = complete_dataset(out, settings)
        if summary is not None:
            return summary
    (out / COMPLETE_MARKER).unlink(missing_ok=True)  # complete again only once everything below is written
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"image_folder": str(image_dir), "question_types": {}}
    from tqdm.auto import tqdm

    for split, n_images in (("train", n_train), ("eval", n_eval)):
        used = {t: 0 for t in question_types}
        records = []
        for index in tqdm(range(n_images), desc=f"images ({split})", unit="img", disable=not progress,
                          dynamic_ncols=True):
            rng = random.Random(f"{seed}:{split}:{index}")
            scene = make_scene(rng, image_size=image_size, colors=list(palette), shapes=shapes, max_shapes=max_shapes,
                               grid=grid)
            name = f"{split}_{index:05d}.png"
            render_scene(scene, image_size, palette).save(image_dir / name)
            options = [t for t in applicable_question_types(scene) if t in used]
            # least-used types first, ties in random order
            options.sort(key=lambda t: (used[t], rng.random()))
            for k, question_type in enumerate(options[:questions_per_image]):
                question, answer = ask(
                    scene, question_type, rng, colors=list(palette), shapes=shapes, want_yes=used[question_type] % 2 == 0
                )
                used[question_type] += 1
                records.append(
                    {
                        "id": f"{split}_{index:05d}_{k}",
                        "image": name,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{question}"},
                            {"from": "gpt", "value": answer},
                        ],
                        "question_type": question_type,
                        "shapes": [{"shape": s.kind, "color": s.color, "box": list(s.box)} for s in scene],
                    }
                )
        path = out / f"{split}.json"
        path.write_text(json.dumps(records, indent=1))
        summary[split] = str(path)
        summary[f"n_{split}_images"] = n_images
        summary[f"n_{split}_samples"] = len(records)
        summary["question_types"][split] = used
    counts = {k: v for k, v in summary.items() if k not in ("image_folder", "train", "eval")}
    (out / COMPLETE_MARKER).write_text(json.dumps({"settings": settings, "summary": counts}, indent=1))
    return {**summary, "reused": False}


def complete_dataset(out_dir: str | Path, settings: dict) -> dict | None:
    """The summary of the complete set in `out_dir` made from `settings`; None when there is none (never
    generated, interrupted, other settings, a file missing)."""
    out = Path(out_dir)
    try:
        marker = json.loads((out / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("settings") != settings:
        return None
    image_dir = out / "images"
    names = {f"{split}_{index:05d}.png" for split in ("train", "eval") for index in range(settings[f"n_{split}"])}
    if not (out / "train.json").is_file() or not (out / "eval.json").is_file():
        return None
    try:
        present = {entry.name for entry in os.scandir(image_dir)}
    except OSError:
        return None
    if not names <= present:
        return None
    return {**marker["summary"], "image_folder": str(image_dir), "train": str(out / "train.json"),
            "eval": str(out / "eval.json"), "reused": True}


def wrong_answer(record: dict, rng: random.Random, *, colors: Sequence[str], shapes: Sequence[str],
                 max_shapes: int) -> str:
    """A plausible wrong one-word answer to `record`'s question (a record of `generate_shapes_dataset`): another
    colour / shape kind seen in the picture when there is one, else any other of the palette / kinds / counts
    1..max_shapes; for a yes/no question the other word. Never the true answer."""
    truth = record["conversations"][1]["value"]
    scene = record["shapes"]
    kind = record["question_type"]
    if kind == "exists":
        return "no" if truth == "yes" else "yes"
    if kind == "count":
        options = [str(n) for n in range(1, max(max_shapes, 2) + 1) if str(n) != truth]
    else:
        field, every = ("color", colors) if kind == "color" else ("shape", shapes)
        options = sorted({s[field] for s in scene} - {truth}) or [x for x in every if x != truth]
    if not options:
        raise ConfigError(f"no wrong answer exists for {record['id']!r} ({kind}: {truth!r}); "
                          "give at least two colours and two shape kinds")
    return rng.choice(options)


def preference_pairs(records: list[dict], *, seed: int, colors: Sequence[str], shapes: Sequence[str],
                     max_shapes: int) -> list[dict]:
    """LLaVA-style preference records from single-question records: the question turn, `chosen` = the true
    answer, `rejected` = `wrong_answer(...)` (drawn from a stream seeded by (seed, record id): the same pairs
    for the same set); `image`, `question_type` and `shapes` are kept."""
    pairs = []
    for record in records:
        question, answer = record["conversations"]
        rng = random.Random(f"{seed}:preference:{record['id']}")
        pairs.append({"id": record["id"], "image": record["image"], "conversations": [question],
                      "chosen": answer["value"],
                      "rejected": wrong_answer(record, rng, colors=colors, shapes=shapes, max_shapes=max_shapes),
                      "question_type": record["question_type"], "shapes": record["shapes"]})
    return pairs


def write_preference_pairs(out_dir: str | Path, *, splits: Sequence[str] = ("train", "eval")) -> dict[str, str]:
    """`{split}_preference.json` beside each `{split}.json` of the complete set in `out_dir` (palette, kinds,
    max_shapes and seed read from its `complete.json`); returns {split: path}. Deterministic: rewriting gives
    the same bytes."""
    out = Path(out_dir)
    try:
        settings = json.loads((out / COMPLETE_MARKER).read_text())["settings"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{out} holds no complete shapes set ({COMPLETE_MARKER} missing or damaged); "
                          "generate it first (`vlm data synth --out DIR`)") from None
    written = {}
    for split in splits:
        records = json.loads((out / f"{split}.json").read_text())
        pairs = preference_pairs(records, seed=settings["seed"], colors=list(settings["colors"]),
                                 shapes=settings["shapes"], max_shapes=settings["max_shapes"])
        path = out / f"{split}_preference.json"
        path.write_text(json.dumps(pairs, indent=1))
        written[split] = str(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """`vlm data synth --out DIR --n_train N --n_eval M --image_size S --seed K [--preference]`."""
    parser = argparse.ArgumentParser(prog="vlm data synth", description="Write the synthetic shapes set (LLaVA JSON + PNGs).")
    parser.add_argument("--out", required=True, help="output folder (images/, train.json, eval.json)")
    parser.add_argument("--n_train", type=int, default=2000, help="training images")
    parser.add_argument("--n_eval", type=int, default=200, help="evaluation images")
    parser.add_argument("--image_size", type=int, default=64, help="picture side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--questions_per_image", type=int, default=2, help="samples per image")
    parser.add_argument("--grid", type=int, default=None, help="one shape per cell of a GRID x GRID layout")
    parser.add_argument("--max_shapes", type=int, default=3, help="most shapes per picture")
    parser.add_argument("--preference", action="store_true",
                        help="also write {train,eval}_preference.json: chosen = the true answer, rejected = a wrong one")
    args = parser.parse_args(argv)
    summary = generate_shapes_dataset(
        args.out,
        n_train=args.n_train,
        n_eval=args.n_eval,
        image_size=args.image_size,
        seed=args.seed,
        questions_per_image=args.questions_per_image,
        max_shapes=args.max_shapes,
        grid=args.grid,
    )
    if args.preference:
        summary["preference"] = write_preference_pairs(args.out)
    print(json.dumps(summary, indent=1))
    return 0


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def _check_options(n_train, n_eval, image_size, questions_per_image, palette, shapes, max_shapes, question_types) -> None:
    if n_train < 0 or n_eval < 0:
        raise ConfigError(f"n_train ({n_train}) and n_eval ({n_eval}) must be >= 0")
    if image_size < 16:
        raise ConfigError(f"image_size={image_size} is too small to draw shapes; use at least 16")
    if questions_per_image < 1:
        raise ConfigError(f"questions_per_image={questions_per_image} must be >= 1")
    if len(palette) < 2 or any(not name.isalpha() or name != name.lower() for name in palette):
        raise ConfigError(f"colors {list(palette)}: give at least two lowercase one-word colour names")
    unknown = set(shapes) - set(DEFAULT_SHAPES)
    if not shapes or unknown:
        raise ConfigError(f"shapes {list(shapes)}: choose among {DEFAULT_SHAPES}")
    if max_shapes < 1:
        raise ConfigError(f"max_shapes={max_shapes} must be >= 1")
    unknown = set(question_types) - set(QUESTION_TYPES)
    if not question_types or unknown:
        raise ConfigError(f"question_types {list(question_types)}: choose among {QUESTION_TYPES}")
