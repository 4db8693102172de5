"""Visual instruction data generated from labels: varied questions with short exact answers.

Fashion-MNIST gives the item ("What is this item?" -> "sneaker"), yes/no questions about a named item and
whether it is footwear; the generated shapes set gives shape, colour, count, position and size of its one
or two shapes ("What colour is the star?" -> "red", "How many shapes are there?" -> "two",
"Where is the blue square?" -> "left"). Every question has several phrasings so a model cannot key on one
wording. Samples are seeded: the same ``seed`` gives the same questions.

``VQASet`` holds one image per sample with one or more (question, answer, kind) turns; training uses several
turns per image (one sequence, loss on every answer), evaluation one question per image.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from lowbit.errors import LowbitError
from lowbit.registry import Registry


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    kind: str


@dataclass
class VQASet:
    """Images with question/answer turns: ``turns[i]`` are about ``images[i]``."""

    name: str
    images: list[Image.Image]
    turns: list[list[Turn]]
    split: str = "test"
    captions: list[str] | None = None  # one description per image (class name, scene caption)

    def __len__(self) -> int:
        return len(self.images)


ITEM_QUESTIONS = ["What is this item?", "What kind of clothing item is shown?", "What is in the picture?",
                  "Name the item in the image.", "What type of item is this?", "Which fashion item is this?",
                  "What is shown in the image?", "Identify the item."]
IS_QUESTIONS = ["Is this a {}?", "Is the item a {}?", "Does the picture show a {}?"]
FOOTWEAR_QUESTIONS = ["Is this item worn on the feet?", "Is this footwear?", "Is this a kind of shoe?"]
FOOTWEAR = {"sandal", "sneaker", "ankle boot"}

SHAPE_QUESTIONS = ["What shape is in the image?", "What shape is shown?", "Which shape do you see?"]
RELATION_SHAPE_QUESTIONS = ["What shape is {where} the {other}?", "Which shape is {where} the {other}?"]
COLOUR_QUESTIONS = ["What colour is the {kind}?", "What is the colour of the {kind}?", "Which colour is the {kind}?"]
COUNT_QUESTIONS = ["How many shapes are there?", "How many shapes are in the image?", "Count the shapes."]
POSITION_QUESTIONS = ["Where is the {shape}?", "Where is the {shape} in the image?"]
RELATION_QUESTIONS = ["Where is the {shape} relative to the {other}?",
                      "How is the {shape} placed relative to the {other}?"]
SIZE_QUESTIONS = ["Is the {kind} small or large?", "How big is the {kind}, small or large?"]
POSITION_WORDS = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom",
                  "in the center": "center"}
RELATION_WORDS = {"above": "above", "below": "below", "to the left of": "left", "to the right of": "right"}
COUNT_WORDS = {1: "one", 2: "two"}


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation and leading articles removed: the form exact-match compares.

    Example:
        >>> normalize_answer("A Sneaker."), normalize_answer(" the  ankle boot! ")
        ('sneaker', 'ankle boot')
    """
    words = re.sub(r"[^a-z0-9\- ]+", " ", text.lower()).split()
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def fashion_turns(label: str, classnames: Sequence[str], rng: random.Random) -> dict[str, Turn]:
    """One question of each Fashion-MNIST kind about an image of class ``label``."""
    other = rng.choice([c for c in classnames if c != label])
    named = label if rng.random() < 0.5 else other
    return {
        "item": Turn(rng.choice(ITEM_QUESTIONS), label, "item"),
        "yesno": Turn(rng.choice(IS_QUESTIONS).format(named), "yes" if named == label else "no", "yesno"),
        "footwear": Turn(rng.choice(FOOTWEAR_QUESTIONS), "yes" if label in FOOTWEAR else "no", "footwear"),
    }


def shape_turns(scene: object, rng: random.Random) -> dict[str, Turn]:
    """One question of each applicable shapes kind about ``scene`` (a ``lowbit.data.shapes.Scene``)."""
    first, second, where = scene.first, scene.second, scene.where  # type: ignore[attr-defined]
    shapes = [first] if second is None else [first, second]
    turns = {"count": Turn(rng.choice(COUNT_QUESTIONS), COUNT_WORDS[len(shapes)], "count")}
    if second is None:
        turns["shape"] = Turn(rng.choice(SHAPE_QUESTIONS), first.kind, "shape")
        turns["position"] = Turn(rng.choice(POSITION_QUESTIONS).format(shape=f"{first.colour} {first.kind}"),
                                 POSITION_WORDS[where], "position")
    else:
        other = f"{second.colour} {second.kind}"
        turns["shape"] = Turn(rng.choice(RELATION_SHAPE_QUESTIONS).format(where=where, other=other), first.kind,
                              "shape")
        turns["position"] = Turn(rng.choice(RELATION_QUESTIONS).format(shape=f"{first.colour} {first.kind}",
                                                                       other=other), RELATION_WORDS[where], "position")
    unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]  # "the circle" must be one shape
    if unique:
        s = rng.choice(unique)
        turns["colour"] = Turn(rng.choice(COLOUR_QUESTIONS).format(kind=s.kind), s.colour, "colour")
        s = rng.choice(unique)
        turns["size"] = Turn(rng.choice(SIZE_QUESTIONS).format(kind=s.kind), s.size, "size")
    return turns


def _pick(turns: dict[str, Turn], n: int, rng: random.Random) -> list[Turn]:
    kinds = list(turns)
    rng.shuffle(kinds)
    return [turns[k] for k in kinds[:n]]


def fashion_vqa(split: str = "test", limit: int | None = None, turns_per_image: int = 1, seed: int = 0) -> VQASet:
    """Fashion-MNIST ``split`` images (seeded balanced subset of ``limit``) with generated questions."""
    from lowbit.data.fashion_mnist import CLASSNAMES, load_fashion_mnist

    data = load_fashion_mnist(split=split, limit=limit)
    rng = random.Random(seed * 1_000_003 + (split == "train"))
    names = list(data.classnames or CLASSNAMES)
    turns = [_pick(fashion_turns(names[y], names, rng), turns_per_image, rng) for y in data.labels or []]
    return VQASet("fashion-vqa", list(data.images), turns, split, [names[y] for y in data.labels or []])


def shapes_vqa(split: str = "test", limit: int | None = None, turns_per_image: int = 1, seed: int = 0,
               size: int = 64) -> VQASet:
    """The shapes ``split`` (same scenes as ``lowbit.data.shapes``) with generated questions."""
    from lowbit.data.base import check_limit, check_split
    from lowbit.data.shapes import SPLITS, render_scene, sample_scenes

    check_split("shapes", split)
    check_limit(limit)
    n, scene_seed = SPLITS[split]
    scenes = sample_scenes(n if limit is None else min(n, limit), scene_seed)
    rng = random.Random(seed * 1_000_003 + 7 + (split == "train"))
    turns = [_pick(shape_turns(s, rng), turns_per_image, rng) for s in scenes]
    return VQASet("shapes-vqa", [render_scene(s, size) for s in scenes], turns, split, [s.caption for s in scenes])


VQA_SETS: Registry[Callable[..., VQASet]] = Registry("VQA set")
VQA_SETS.register("fashion-vqa")(fashion_vqa)
VQA_SETS.register("shapes-vqa")(shapes_vqa)


def load_vqa(name: str, split: str = "test", limit: int | None = None, turns_per_image: int = 1,
             seed: int = 0) -> VQASet:
    """A generated VQA set by name (``fashion-vqa`` or ``shapes-vqa``)."""
    loader = VQA_SETS.get(name)
    if turns_per_image < 1:
        raise LowbitError(f"turns_per_image must be >= 1; received {turns_per_image}")
    return loader(split=split, limit=limit, turns_per_image=turns_per_image, seed=seed)
