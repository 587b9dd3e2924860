"""The package as a user installs it: metadata (torch bound, version), the files a wheel carries, and the
entry points started from outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata, resources
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import vlm
from vlm.cli.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
DIST = "vlm-kit"  # the import name is vlm; `vlm` on the package index is another project
SHIPPED = ["deepspeed/zero2.json", "deepspeed/zero3.json", "examples/shapes.json", "examples/shapes.png"]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # the scripts call `python` and `torchrun`: take those of the interpreter running the tests
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "PATH": path, **env}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=full_env, timeout=300)


def _build_requires_installed() -> bool:
    """pyproject.toml's build requirements are met by what is installed: the wheel can be built offline."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: let pip build in isolation
        return False
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in map(Requirement, requires):
        try:
            if not requirement.specifier.contains(metadata.version(requirement.name)):
                return False
        except metadata.PackageNotFoundError:
            return False
    return True


# -- metadata ------------------------------------------------------------------------------------------


def test_torch_is_a_lower_bound_not_a_pin():
    """Installing vlm-kit over a working torch (a CUDA 2.12 build, say) must leave it alone."""
    torch_reqs = [Requirement(r) for r in metadata.requires(DIST) if Requirement(r).name == "torch"]
    assert len(torch_reqs) == 1
    (spec,) = torch_reqs[0].specifier
    assert spec.operator == ">=", f"torch must be a lower bound, got {torch_reqs[0]}"
    assert torch_reqs[0].specifier.contains("2.12.1") and torch_reqs[0].specifier.contains("99.0")
    import torch

    assert torch_reqs[0].specifier.contains(torch.__version__.split("+")[0])


def test_version_is_the_metadata_version():
    assert vlm.__version__ == metadata.version(DIST)


def test_console_command_and_extras():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts") if ep.dist.name == DIST}
    assert scripts == {"vlm": "vlm.cli:main"}
    extras = set(metadata.metadata(DIST).get_all("Provides-Extra"))
    assert {"qlora", "gpu", "dev"} <= extras


def test_py_typed_and_assets_found_through_importlib_resources():
    from vlm.assets import asset_path, example, list_assets

    assert resources.files("vlm").joinpath("py.typed").is_file()
    assert list_assets() == SHIPPED
    image, question = example()
    assert image.name == "shapes.png" and question.endswith("?")
    assert json.loads(asset_path("deepspeed/zero3.json").read_text())["zero_optimization"]["stage"] == 3
    with pytest.raises(FileNotFoundError, match="ships: deepspeed/zero2.json"):
        asset_path("zero4.json")


def test_wheel_carries_py_typed_and_assets_and_they_load_outside_the_repo(tmp_path):
    """Build the wheel from a copy of the sources, unpack it (what pip does for a pure-Python wheel) and use it
    from another folder with the repository off the path."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "vlm", src / "vlm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # the installed setuptools when it is new enough for pyproject.toml (no index needed), else pip fetches one
    isolation = ["--no-build-isolation"] if _build_requires_installed() else []
    done = run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", *isolation,
                "-w", str(tmp_path / "dist")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("vlm_kit-*.whl")
    assert wheel.name.startswith(f"vlm_kit-{vlm.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(f"vlm_kit-{vlm.__version__}.dist-info/METADATA").decode()
        z.extractall(tmp_path / "site")
    assert "vlm/py.typed" in names and {f"vlm/assets/{n}" for n in SHIPPED} <= names
    (torch_line,) = [line for line in meta.splitlines() if line.startswith("Requires-Dist: torch")]
    assert torch_line.startswith("Requires-Dist: torch>=") and "==" not in torch_line

    code = ("import vlm, vlm.assets as a; print(vlm.__file__); print(a.list_assets()); "
            "print(a.example()[0].is_file())")
    done = run([sys.executable, "-c", code], cwd=tmp_path, PYTHONPATH=str(tmp_path / "site"))
    assert done.returncode == 0, done.stderr
    file, assets, image_ok = done.stdout.splitlines()
    assert file.startswith(str(tmp_path / "site")) and assets == str(SHIPPED) and image_ok == "True"


# -- entry points from another folder --------------------------------------------------------------------


def test_vlm_ask_help(tmp_path):
    done = run([sys.executable, "-m", "vlm", "ask", "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: vlm ask")
    for flag in ("--model", "--image", "--prompt", "--demo_dir", "--train-demo", "--max_new_tokens"):
        assert flag in done.stdout


def test_test_sh_from_another_folder_keeps_relative_paths(tmp_path):
    """Relative --model/--image are the caller's: the script must not cd into the repository."""
    from inference_helpers import save_tiny_folder, write_image
    from vlm.generate.decoding import GenerationSettings
    from vlm.generate.generator import load_generator

    model = save_tiny_folder(tmp_path / "model", "clip", "qwen2", template="chatml", seed=1)
    write_image(tmp_path / "red.png")
    done = run(["bash", str(REPO / "test.sh"), "--model", "model", "--image", "red.png", "--prompt", "hi",
                "--max-new-tokens", "4"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = load_generator(str(model), settings=GenerationSettings(max_new_tokens=4)).answer(
        "hi", str(tmp_path / "red.png"))
    assert done.stdout == expected + "\n"


def test_train_sh_from_another_folder_keeps_relative_paths(tmp_path):
    """train.sh finds train.py beside itself and reads the caller's relative --config: the run gets as far as
    the missing --output_dir (were the folder changed, it would stop at '--config file not found')."""
    (tmp_path / "run.json").write_text(json.dumps({"model_name_or_path": "x"}))
    done = run(["bash", str(REPO / "train.sh"), "--config", "run.json"], cwd=tmp_path)
    assert done.returncode != 0
    assert "train.py: error: no --output_dir" in done.stderr and "not found" not in done.stderr


# -- train.py without --output_dir --------------------------------------------------------------------------


def test_train_without_output_dir_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_main(["--model_name_or_path", "x", "--vision_tower", "y", "--data_path", "d.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: no --output_dir") and len(err.splitlines()) == 1
    assert not (tmp_path / "trainer_output").exists()


def test_output_dir_given_by_flag_or_config_passes_the_check(tmp_path):
    from vlm.train.arguments import check_output_dir_given

    check_output_dir_given(["--output_dir", "trainer_output"], "trainer_output")  # explicitly asked for
    check_output_dir_given(["--output-dir=out"], "out")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"output_dir": "trainer_output"}))
    check_output_dir_given(["--config", str(config)], "trainer_output")
    config.write_text(json.dumps({"seed": 1}))
    for argv in (["--seed", "1"], ["--config", str(config)]):
        with pytest.raises(ValueError, match="no --output_dir"):
            check_output_dir_given(argv, "trainer_output")


def test_deepspeed_names_resolve_to_the_shipped_configs(tmp_path, monkeypatch, capsys):
    from vlm.assets import asset_path
    from vlm.train.arguments import with_shipped_deepspeed_config

    monkeypatch.chdir(tmp_path)
    shipped = str(asset_path("deepspeed/zero3.json"))
    for name in ("zero3", "zero3.json", "./scripts/zero3.json"):
        assert with_shipped_deepspeed_config(["--bf16", "True", "--deepspeed", name]) == \
            ["--bf16", "True", "--deepspeed", shipped]
        assert f"{name!r} is vlm's shipped config" in capsys.readouterr().out
    own = tmp_path / "scripts" / "zero3.json"  # a user's own file of that name wins
    own.parent.mkdir()
    own.write_text("{}")
    assert with_shipped_deepspeed_config(["--deepspeed", "./scripts/zero3.json"])[1] == "./scripts/zero3.json"


def test_vlm_ask_ctrl_c_is_one_line(monkeypatch, capsys, tmp_path):
    import vlm.cli.options
    from vlm.cli import run
    from vlm.cli.ask import main as ask_main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(vlm.cli.options, "generator_from_args", interrupted)
    assert run("test.py", ask_main, ["--model", str(tmp_path), "--image", "x.png", "--prompt", "hi"]) == 130
    assert capsys.readouterr().err.strip() == "test.py: interrupted"
