"""Generated shapes: deterministic, unique captions, and captions that match the drawn pixels."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.data import DATASETS, SHAPE_KINDS, generate_shapes, load_shapes
from lowbit.data.shapes import COLOURS, POSITIONS, SPLITS, Scene, Shape, render_scene, sample_scenes
from lowbit.errors import LowbitError


def _colour_mask(img: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within a small distance of a palette colour (edges are blended by antialiasing)."""
    return np.abs(img.astype(int) - np.array(COLOURS[colour])).sum(axis=-1) < 30


def test_same_seed_same_bytes_different_seed_differs() -> None:
    a, b, c = generate_shapes(40, seed=7), generate_shapes(40, seed=7), generate_shapes(40, seed=8)
    assert a.captions == b.captions
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert a.captions != c.captions
    assert [im.tobytes() for im in a.images] != [im.tobytes() for im in c.images]
    assert len({im.tobytes() for im in a.images}) == 40  # distinct samples are distinct images


def test_splits_sizes_seeds_and_prefix_limit() -> None:
    assert SPLITS["train"][0] == 5000 and SPLITS["test"][0] == 1000
    assert SPLITS["train"][1] != SPLITS["test"][1]
    test = load_shapes("test")
    assert len(test) == 1000 and test.captions is not None
    assert len(set(test.captions)) == 1000  # text->image retrieval has one right answer per caption
    assert load_shapes("test", limit=25).captions == test.captions[:25]
    assert load_shapes("train", limit=25).captions != test.captions[:25]
    assert DATASETS.get("shapes") is load_shapes
    with pytest.raises(LowbitError, match="unknown shapes split 'dev'; choose one of: test, train"):
        load_shapes("dev")


def test_labels_and_captions_name_the_first_shape() -> None:
    ds = generate_shapes(200, seed=3)
    assert ds.classnames == SHAPE_KINDS and ds.labels is not None and ds.captions is not None
    assert any(" above " in c for c in ds.captions) and any(" on the left" in c for c in ds.captions)
    for caption, label in zip(ds.captions, ds.labels, strict=True):
        words = caption.split()
        assert words[0] == "a" and words[1] in ("small", "large") and words[2] in COLOURS
        assert words[3] == ds.classnames[label]
    assert all("{}" in t for t in ds.templates)


def test_pixels_show_the_captioned_colour_and_place() -> None:
    for scene in sample_scenes(150, seed=11):
        img = np.asarray(render_scene(scene, 64))
        first = _colour_mask(img, scene.first.colour)
        assert first.sum() > 20, scene.caption
        ys, xs = np.nonzero(first)
        if scene.second is None:
            px, py = POSITIONS[scene.where]
            assert abs(xs.mean() / 64 - px) < 0.1 and abs(ys.mean() / 64 - py) < 0.1, scene.caption
        elif scene.second.colour != scene.first.colour:
            ys2, xs2 = np.nonzero(_colour_mask(img, scene.second.colour))
            dx, dy = xs.mean() - xs2.mean(), ys.mean() - ys2.mean()
            expected = {
                "above": dy < -15,
                "below": dy > 15,
                "to the left of": dx < -15,
                "to the right of": dx > 15,
            }
            assert expected[scene.where], scene.caption


def test_kinds_and_sizes_look_different() -> None:
    def mask(kind: str, size: str) -> np.ndarray:
        img = np.asarray(render_scene(Scene(Shape(kind, "red", size), "in the center"), 64))
        return _colour_mask(img, "red")

    large = {kind: mask(kind, "large") for kind in SHAPE_KINDS}
    for a in SHAPE_KINDS:
        for b in SHAPE_KINDS:
            if a < b:
                assert (large[a] ^ large[b]).sum() > 60, (a, b)  # silhouettes differ, not just by a rim
    assert all(mask(kind, "small").sum() < large[kind].sum() / 2 for kind in SHAPE_KINDS)


def test_bad_arguments() -> None:
    with pytest.raises(LowbitError, match="non-negative integer"):
        generate_shapes(-1)
    with pytest.raises(LowbitError, match="at least 16 pixels"):
        generate_shapes(2, size=4)
    assert len(generate_shapes(0)) == 0
    assert generate_shapes(3, size=96).images[0].size == (96, 96)
