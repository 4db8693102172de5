"""The one in-memory shape every dataset loader returns, and the dataset registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from lowbit.errors import LowbitError, unknown_choice
from lowbit.registry import Registry


@dataclass
class ImageTextSet:
    """Images with labels and/or captions.

    - ``images[i]`` is an RGB or L PIL image.
    - ``labels[i]`` indexes ``classnames`` (classification data), or ``labels`` is None.
    - ``captions[i]`` describes ``images[i]`` (retrieval data), or ``captions`` is None.
    - ``templates`` are prompt templates with one ``{}`` for the class name, for zero-shot classification.
    - ``skipped`` counts unreadable/corrupt/empty images that were left out (with a warning).
    """

    name: str
    images: list[Image.Image]
    labels: list[int] | None = None
    classnames: list[str] | None = None
    captions: list[str] | None = None
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None) -> ImageTextSet:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return ImageTextSet(
            name=self.name,
            images=self.images[:n],
            labels=None if self.labels is None else self.labels[:n],
            classnames=self.classnames,
            captions=None if self.captions is None else self.captions[:n],
            templates=self.templates,
            skipped=self.skipped,
        )


# A loader takes (split, limit) and returns an ImageTextSet. Names: "fashion-mnist", "shapes", ...
DatasetLoader = Callable[..., ImageTextSet]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def check_split(dataset: str, split: str, accepted: tuple[str, ...] = ("train", "test")) -> str:
    """Return ``split`` if ``dataset`` has it, else raise the standard 'unknown ... split' LowbitError."""
    if split not in accepted:
        raise unknown_choice(f"{dataset} split", str(split), list(accepted))
    return split


def check_limit(limit: int | None) -> int | None:
    """Return ``limit`` if it is None or a positive int, else raise LowbitError.

    Zero is refused too: an empty evaluation set would only fail later with a less clear message.
    """
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise LowbitError(f"limit must be a positive integer or None; got {limit!r}")
    return limit
