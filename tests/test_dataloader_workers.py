"""`--dataloader_num_workers`: images are decoded in DataLoader workers unless the user says otherwise."""

from __future__ import annotations

import os

import pytest

from vlm.train.arguments import default_dataloader_workers, parse_args


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.parametrize("local_world_size,expected", [(None, lambda c: min(4, c)), ("2", lambda c: max(1, min(4, c // 2))),
                                                       ("512", lambda c: 1)])
def test_default_is_min_4_and_the_cpus_of_each_process(monkeypatch, tmp_path, local_world_size, expected):
    if local_world_size is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world_size)
    assert default_dataloader_workers() == expected(_cpus()) >= 1
    _, _, training = parse_args(["--output_dir", str(tmp_path)])
    assert training.dataloader_num_workers == expected(_cpus())


def test_default_follows_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_dataloader_workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_dataloader_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_dataloader_workers() == 2


@pytest.mark.parametrize("given", ["0", "3"])
def test_an_explicit_value_is_kept(tmp_path, given):
    _, _, training = parse_args(["--output_dir", str(tmp_path), "--dataloader_num_workers", given])
    assert training.dataloader_num_workers == int(given)


def test_help_says_the_default(capsys):
    from vlm.train.arguments import DataArguments, ModelArguments, VLMTrainingArguments
    from vlm.train.help import help_text

    text = help_text((ModelArguments, DataArguments, VLMTrainingArguments))
    line = next(line for line in text.splitlines() if "--dataloader_num_workers" in line)
    assert "default min(4, CPUs per process)" in line and "0: none" in line
