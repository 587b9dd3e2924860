"""README's layout table matches the tree: every path it names exists with the layer tests/test_layers.py
checks, and every module of the package is named (as `vlm/x.py`, or by its name in its package's row)."""

from __future__ import annotations

import re

from test_layers import MODULES, ROOT, layer, module_name

ROW = re.compile(r"^\| (\d|-) \| (.+?) \| (.+) \|$")


def layout_rows() -> list[tuple[str, list[str], list[str]]]:
    """(layer, paths, names in backticks in the description) for each row of README's Layout table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout\n"):]
    section = section[:section.find("\n## ", 5)] if "\n## " in section[5:] else section
    rows = []
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            rows.append((match[1], re.findall(r"`([^`]+)`", match[2]), re.findall(r"`([^`]+)`", match[3])))
    return rows


def test_every_path_exists_with_its_layer():
    rows = layout_rows()
    assert len(rows) >= 20
    for level, paths, _ in rows:
        for path in paths:
            assert (ROOT / path).exists(), f"README's layout names {path}, which does not exist"
            if path.startswith("vlm/") and level != "-":
                assert layer(module_name(ROOT / path) if path.endswith(".py") else path.rstrip("/").replace("/", ".")) \
                    == int(level), f"{path}: README says layer {level}"


def test_every_module_is_in_the_table():
    named_files = {path for _, paths, _ in layout_rows() for path in paths if path.endswith(".py")}
    packages = {path.rstrip("/"): names for _, paths, names in layout_rows() for path in paths if path.endswith("/")}
    missing = []
    for module, file in MODULES.items():
        rel = file.relative_to(ROOT).as_posix()
        if rel in named_files:
            continue
        package = next((p for p in sorted(packages, key=len, reverse=True) if rel.startswith(p + "/")), None)
        if package is None:
            missing.append(rel)
            continue
        inner = rel[len(package) + 1:]
        if package in ("vlm/assets",) or inner == "__init__.py":
            continue
        first = inner.split("/")[0]
        token = first + "/" if "/" in inner else first.removesuffix(".py")
        if token not in packages[package] and first not in packages[package]:
            missing.append(rel)
    assert not missing, f"modules not in README's layout table: {missing}"
