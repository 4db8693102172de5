"""Datasets: Fashion-MNIST (offline IDX files), generated shapes and scenes, and user folders of images.

Importing registers the built-in loaders in ``DATASETS``; nothing is read or generated until called.
"""

from lowbit.data.base import DATASETS, ImageTextSet
from lowbit.data.fashion_mnist import CLASSNAMES, TEMPLATES, load_fashion_mnist, load_fashion_mnist_arrays
from lowbit.data.folder import load_folder
from lowbit.data.images import ImageSkippedWarning, load_images, open_image
from lowbit.data.resolve import resolve_dataset
from lowbit.data.scenes import generate_scene, load_scenes
from lowbit.data.shapes import SHAPE_KINDS, generate_shapes, load_shapes

__all__ = [
    "CLASSNAMES",
    "DATASETS",
    "SHAPE_KINDS",
    "TEMPLATES",
    "ImageSkippedWarning",
    "ImageTextSet",
    "generate_scene",
    "generate_shapes",
    "load_fashion_mnist",
    "load_fashion_mnist_arrays",
    "load_folder",
    "load_images",
    "load_scenes",
    "load_shapes",
    "open_image",
    "resolve_dataset",
]
