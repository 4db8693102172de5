"""Generated visual instruction data: answers follow from the labels/scenes, varied wording, seeded."""

from __future__ import annotations

import pytest

from lowbit.data.shapes import COLOURS, SHAPE_KINDS, SPLITS, sample_scenes
from lowbit.data.vqa import FOOTWEAR, load_vqa, normalize_answer
from lowbit.errors import LowbitError


def test_shapes_answers_follow_from_the_scene() -> None:
    data = load_vqa("shapes-vqa", "train", limit=200, turns_per_image=5)
    scenes = sample_scenes(200, SPLITS["train"][1])
    kinds = set()
    for scene, turns, caption in zip(scenes, data.turns, data.captions or [], strict=True):
        assert caption == scene.caption
        n = 1 if scene.second is None else 2
        for t in turns:
            kinds.add(t.kind)
            if t.kind == "count":
                assert t.answer == {1: "one", 2: "two"}[n]
            elif t.kind == "colour":
                assert t.answer in COLOURS and t.answer in caption
            elif t.kind == "shape":
                assert t.answer == scene.first.kind and t.answer in SHAPE_KINDS
            elif t.kind == "size":
                assert t.answer in ("small", "large") and t.answer in caption
    assert kinds == {"count", "colour", "shape", "size", "position"}
    assert len({t.question for turns in data.turns for t in turns}) >= 20  # varied phrasings


def test_fashion_answers_follow_from_the_label() -> None:
    data = load_vqa("fashion-vqa", "test", limit=300, turns_per_image=3)
    for label, turns in zip(data.captions or [], data.turns, strict=True):
        for t in turns:
            if t.kind == "item":
                assert t.answer == label
            elif t.kind == "footwear":
                assert t.answer == ("yes" if label in FOOTWEAR else "no")
            else:
                named = t.question.split(" a ")[-1].rstrip("?")
                assert t.answer == ("yes" if named == label else "no")
    yes = sum(t.answer == "yes" for turns in data.turns for t in turns if t.kind == "yesno")
    total = sum(t.kind == "yesno" for turns in data.turns for t in turns)
    assert 0.35 < yes / total < 0.65  # balanced yes/no


def test_seeded_and_split_specific() -> None:
    a = load_vqa("shapes-vqa", "test", limit=20, seed=0)
    b = load_vqa("shapes-vqa", "test", limit=20, seed=0)
    c = load_vqa("shapes-vqa", "test", limit=20, seed=1)
    assert a.turns == b.turns and a.turns != c.turns
    assert [i.tobytes() for i in a.images] == [i.tobytes() for i in b.images]
    with pytest.raises(LowbitError, match="unknown VQA set"):
        load_vqa("nope")


def test_normalize_answer() -> None:
    assert normalize_answer("The Ankle boot.") == "ankle boot"
    assert normalize_answer("t-shirt!") == "t-shirt"
    assert normalize_answer("  Two ") == "two"
