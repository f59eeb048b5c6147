"""Prompt files and the bundled digits (image folders and shards: test_datasets.py)."""

import os
from pathlib import Path

import pytest
import torch

from dmd2_train.data import DataError, digit_caption, digits_data, load_digits, read_prompts


def test_digits_are_real_and_split():
    train, labels = load_digits("train")
    held, _ = load_digits("heldout")
    assert train.shape[1:] == (1, 8, 8) and len(train) + len(held) == 1797
    assert train.min() == -1 and train.max() == 1
    assert set(labels.tolist()) == set(range(10))


def test_captions_vary_in_form():
    caps = {digit_caption(7, j) for j in range(10)}
    assert "a handwritten 7" in caps and "the number seven" in caps and "a drawing of a seven" in caps


def test_digits_data_draws_reproducibly():
    data = digits_data()
    a = data.real_batch(4, torch.Generator().manual_seed(1))
    b = data.real_batch(4, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_prompt_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"text": "a"}\n{"caption": "b"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "bad.jsonl").write_text('{"url": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "theirs.txt").write_text("a cat\n")
    (tmp_path / "theirs.txt").chmod(0)  # another user's file: a PermissionError traceback after the teacher loaded
    if os.access(tmp_path / "theirs.txt", os.R_OK):  # root reads it anyway: the error as a non-root user meets it
        def refused(*args: object, **kwargs: object) -> str:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(DataError, match="prompt file '.*theirs.txt' cannot be read .Permission denied.; check its"):
        read_prompts(tmp_path / "theirs.txt")
