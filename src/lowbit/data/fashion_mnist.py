"""Fashion-MNIST from the offline IDX files (``apt-get install dataset-fashion-mnist``)."""

from __future__ import annotations

import functools
import gzip
import math
from pathlib import Path

import numpy as np
from PIL import Image

from lowbit import paths
from lowbit.data.base import DATASETS, ImageTextSet, check_limit, check_split
from lowbit.errors import LowbitError

# Natural names rather than the official "T-shirt/top", "Ankle boot": CLIP text towers were trained on
# web captions, and prompts read better with plain lower-case nouns.
CLASSNAMES: list[str] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]

# Prompt ensemble for zero-shot classification; also the caption templates model-building code trains on.
# Several describe the data honestly (greyscale, low resolution, centred) because that helps CLIP.
TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}, a type of clothing.",
    "a centered photo of a {}.",
    "an item of clothing: a {}.",
    "a grayscale photo of a {}.",
    "a blurry photo of a {}.",
]

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or set LOWBIT_FASHION_MNIST"


def _read_file(root: Path, stem: str) -> bytes:
    """The decompressed bytes of ``stem.gz`` (as shipped) or an already-unpacked ``stem``."""
    for path, opener in ((root / f"{stem}.gz", gzip.open), (root / stem, open)):
        if path.is_file():
            try:
                with opener(path, "rb") as f:
                    return f.read()
            except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; a cut-off gzip is an EOFError
                raise LowbitError(f"cannot read Fashion-MNIST file {path}: {exc}; {_INSTALL_HINT}") from exc
    raise LowbitError(f"Fashion-MNIST file {stem}.gz not found in {root}; {_INSTALL_HINT}")


def parse_idx(raw: bytes, magic: int, name: str = "IDX data") -> np.ndarray:
    """Parse an unsigned-byte IDX buffer into a read-only uint8 array, checking magic number and size.

    IDX layout: 4-byte big-endian magic (0, 0, dtype=0x08, ndim), ndim big-endian uint32 sizes, data.
    """
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        got = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise LowbitError(f"{name} is not an IDX file of this kind: magic {got}, expected {magic:08x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise LowbitError(f"{name} is truncated: {len(raw)} bytes, header alone needs {header}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise LowbitError(
            f"{name} has {len(raw) - header} data bytes; its header {shape} promises {expected}"
        )
    # frombuffer over immutable bytes gives a read-only view: no copy, and the cache cannot be mutated.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _load_arrays(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    # Keyed on the directory too, so pointing LOWBIT_FASHION_MNIST elsewhere never returns stale arrays.
    if not root.is_dir():
        raise LowbitError(f"Fashion-MNIST not found: {root} is not a directory; {_INSTALL_HINT}")
    image_stem, label_stem = _FILES[split]
    images = parse_idx(_read_file(root, image_stem), _IMAGES_MAGIC, f"{root / image_stem}")
    labels_u8 = parse_idx(_read_file(root, label_stem), _LABELS_MAGIC, f"{root / label_stem}")
    if images.shape[1:] != (28, 28) or len(images) != len(labels_u8):
        raise LowbitError(
            f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels_u8.shape}; "
            "expected [N, 28, 28] images and N labels"
        )
    if labels_u8.size and int(labels_u8.max()) >= len(CLASSNAMES):
        raise LowbitError(f"Fashion-MNIST {split} labels go up to {int(labels_u8.max())}; expected 0-9")
    labels = labels_u8.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def load_fashion_mnist_arrays(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(images uint8 [N, 28, 28], labels int64 [N])`` for ``split`` ("train" or "test").

    Parsed once per process and cached; the arrays are read-only because they are shared.
    """
    check_split("fashion-mnist", split)
    return _load_arrays(Path(paths.FASHION_MNIST_DIR), split)


def subset_indices(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """The first ``limit`` entries of a seeded permutation of ``range(n)`` (all of ``range(n)`` if None).

    A random rather than leading subset keeps classes balanced; the fixed seed keeps it reproducible,
    and smaller limits are prefixes of larger ones.
    """
    if limit is None:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:limit]


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(split: str = "test", limit: int | None = None) -> ImageTextSet:
    """Fashion-MNIST ``split`` as 28x28 'L' images with labels, CLASSNAMES, TEMPLATES and captions.

    ``captions[i]`` is ``TEMPLATES[0]`` filled with the class name ("a photo of a trouser."), so the set
    also works for retrieval. ``limit`` takes a seeded (seed 0) random subset, see ``subset_indices``.
    """
    check_limit(limit)
    images, labels = load_fashion_mnist_arrays(split)
    idx = subset_indices(len(images), limit)
    label_list = [int(labels[i]) for i in idx]
    return ImageTextSet(
        name="fashion-mnist",
        images=[Image.fromarray(images[i]) for i in idx],
        labels=label_list,
        classnames=list(CLASSNAMES),
        captions=[TEMPLATES[0].format(CLASSNAMES[y]) for y in label_list],
        templates=list(TEMPLATES),
    )
