"""No flag that does nothing: every training/model/data flag is read by the code outside its definition,
translated to the transformers flag it is an old name of, or refused at any value but the one vlm supports."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import transformers

from vlm.train.arguments import FIXED_VALUES, DataArguments, ModelArguments, VLMTrainingArguments, parse_args

ROOT = Path(__file__).resolve().parent.parent
ARGUMENTS = ROOT / "vlm" / "train" / "arguments.py"
# old names of transformers flags: (value given, transformers field, value it must land in)
TRANSLATED = {"evaluation_strategy": ("steps", "eval_strategy", "steps"), "warmup_ratio": (0.1, "warmup_steps", 0.1)}


def _names_read(path: Path) -> set[str]:
    """Attribute names `path` reads: `x.name` loads and `getattr(x, "name", ...)`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            names.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            names.add(node.args[1].value)
    return names


def _read_outside_the_flag_definitions() -> set[str]:
    files = [*sorted((ROOT / "vlm").rglob("*.py")), ROOT / "train.py", ROOT / "test.py"]
    return set().union(*(_names_read(path) for path in files if path != ARGUMENTS))


def _own_flags() -> list[str]:
    """Every field of the three argument classes except transformers' own (its Trainer reads those)."""
    theirs = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    return [f.name for cls in (ModelArguments, DataArguments, VLMTrainingArguments) for f in dataclasses.fields(cls)
            if not (cls is VLMTrainingArguments and f.name in theirs)]


def test_every_flag_is_read_translated_or_refused():
    read = _read_outside_the_flag_definitions()
    unused = [name for name in _own_flags() if name not in read and name not in FIXED_VALUES and name not in TRANSLATED]
    assert unused == [], f"flags that parse and do nothing: {unused}"


@pytest.mark.parametrize("name", sorted(FIXED_VALUES))
def test_fixed_value_flags_refuse_any_other_value(name, tmp_path):
    supported, why = FIXED_VALUES[name]
    parse_args(["--output_dir", str(tmp_path), f"--{name}", str(supported)])  # the supported value parses
    with pytest.raises(ValueError, match=f"--{name} {not supported} is not supported") as info:
        parse_args(["--output_dir", str(tmp_path), f"--{name}", str(not supported)])
    assert why in str(info.value)


@pytest.mark.parametrize("name", sorted(TRANSLATED))
def test_old_flag_names_reach_transformers(name, tmp_path):
    given, target, expected = TRANSLATED[name]
    _, _, training_args = parse_args(["--output_dir", str(tmp_path), f"--{name}", str(given)])
    value = getattr(training_args, target)
    assert (value.value if hasattr(value, "value") else value) == expected
