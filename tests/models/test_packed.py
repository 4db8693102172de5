"""The packed-checkpoint family: ``lowbit.load(dir, backend=...)`` picks the kernel path of every packed layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lowbit.checkpoint as ckpt
from lowbit.kernels.quant_linear import QuantLinear
from lowbit.models import load_model
from tests.test_checkpoint import PIX, TOK, _quantized, build


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_load_with_backend_routes_every_packed_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      backend: str) -> None:
    model, out = _quantized(tmp_path)
    monkeypatch.setattr(ckpt, "default_float_builder", build)  # the toy's family is not registered
    loaded = load_model(str(out), backend=backend)
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.backend == backend for m in layers)
    with torch.no_grad():
        img, ref_img = loaded.encode_image(PIX), model.encode_image(PIX)
        txt, ref_txt = loaded.encode_text(TOK), model.encode_text(TOK)
    if backend == "reference":
        assert torch.equal(img, ref_img) and torch.equal(txt, ref_txt)
    else:  # int8 activations per row inside the kernels: close to the dequantized float path, not equal
        assert torch.nn.functional.cosine_similarity(img, ref_img).min() > 0.999
        assert torch.nn.functional.cosine_similarity(txt, ref_txt).min() > 0.999


def test_unknown_backend_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.errors import LowbitError

    _, out = _quantized(tmp_path)
    monkeypatch.setattr(ckpt, "default_float_builder", build)
    with pytest.raises(LowbitError, match="unknown linear backend 'gpu'"):
        load_model(str(out), backend="gpu")
