"""Where lowbit keeps its cache and where the offline datasets live."""

from __future__ import annotations

import os
from pathlib import Path

FASHION_MNIST_DIR = Path(os.environ.get("LOWBIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def lowbit_home() -> Path:
    """The cache root: ``$LOWBIT_HOME`` or ``~/.cache/lowbit``; created on first use."""
    home = Path(os.environ.get("LOWBIT_HOME", Path.home() / ".cache" / "lowbit"))
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from lowbit.errors import LowbitError

        raise LowbitError(f"LOWBIT_HOME {str(home)!r} cannot be created ({err.strerror or err}); accepted: a "
                          "writable directory (set LOWBIT_HOME)") from None
    return home
