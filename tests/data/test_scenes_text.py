"""Generated ``scenes`` (the default image calibration set), text / chat JSONL files, and the new dataset forms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowbit.data import resolve_dataset
from lowbit.data.text import is_text_data, read_text_items
from lowbit.errors import LowbitError


def test_scenes_are_deterministic_varied_and_split_disjoint() -> None:
    a = resolve_dataset("scenes", split="train", limit=6)
    b = resolve_dataset("scenes", split="train", limit=6)
    test = resolve_dataset("scenes", split="test", limit=6)
    arrays = [np.asarray(im) for im in a.images]
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(arrays, b.images, strict=True))
    assert a.captions == b.captions and all(c.startswith("a ") and "background with" in c for c in a.captions)
    assert all(im.size == (224, 224) and im.mode == "RGB" for im in a.images)
    assert not any(np.array_equal(x, np.asarray(y)) for x in arrays for y in test.images)
    # unlike Fashion-MNIST (grey on black), colourful and varied: channels differ, contrast is high
    stds = [float(x.reshape(-1, 3).std(0).mean()) for x in arrays]
    assert min(stds) > 5 and float(np.mean(stds)) > 25
    assert all(float(np.abs(x[..., 0].astype(float) - x[..., 2]).mean()) > 5 for x in arrays)


def test_text_and_chat_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("first paragraph.\n\nsecond one.")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n\n"
                    + json.dumps({"text": "plain"}) + "\n")
    assert is_text_data(txt) and is_text_data(chat)
    assert read_text_items(txt) == ["first paragraph.\n\nsecond one."]
    assert read_text_items(chat) == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                                     "plain"]
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    assert not is_text_data(captions)  # an image index, not text
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(LowbitError, match=r"bad.jsonl:1: 'messages' must be a non-empty list"):
        read_text_items(bad)


def test_image_folder_without_captions_and_shards(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, path in enumerate([folder / "b.png", folder / "sub" / "a.jpg", folder / "c.png"]):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(path)
    data = resolve_dataset(str(folder), limit=2)
    assert len(data) == 2 and data.captions is None and data.images[0].getpixel((0, 0)) == (0, 0, 0)  # b.png first
    from lowbit.data.shards import write_shards

    write_shards(resolve_dataset("scenes", split="test", limit=5), tmp_path / "shards", shard_size=2, progress=False)
    shards = resolve_dataset(str(tmp_path / "shards"), limit=4)
    assert len(shards) == 4 and len(shards.captions) == 4 and shards.captions[0].startswith("a ")


def test_a_text_file_without_a_suffix_is_text(tmp_path: Path) -> None:
    licence = tmp_path / "LICENSE"
    licence.write_text("GNU GENERAL PUBLIC LICENSE\n")
    assert is_text_data(licence) and read_text_items(licence) == ["GNU GENERAL PUBLIC LICENSE\n"]
