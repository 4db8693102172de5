"""The packed-checkpoint family: ``lowbit.load(dir, backend=...)`` picks the kernel path of every packed layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lowbit.workflows.checkpoint as ckpt
from lowbit.kernels import fast
from lowbit.kernels.quant_linear import DEFAULT_BACKEND, QuantConv2d1x1, QuantLinear, set_backend
from lowbit.workflows.load import load as load_model
from tests.workflows.test_checkpoint import PIX, TOK, _quantized, build


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_load_with_backend_routes_every_packed_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      backend: str) -> None:
    model, out = _quantized(tmp_path)
    set_backend(model, "reference")  # the dequantized fp32 model
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


def test_default_backend_is_the_kernels_within_their_stated_bound(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model, out = _quantized(tmp_path)
    set_backend(model, "reference")  # the dequantized fp32 model
    monkeypatch.setattr(ckpt, "default_float_builder", build)
    loaded = load_model(str(out))  # no backend named: the default
    layers = {name: m for name, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert layers and all(m.backend == DEFAULT_BACKEND == "cpu" for m in layers.values())
    if not fast.is_available():
        pytest.skip(f"kernels unavailable: {fast.unavailable_reason()}")
    assert all(fast.prepared(m).tiles is not None for m in layers.values())  # every layer really on the kernels

    # Each packed layer, on the input it receives inside the model, is within the kernels' elementwise bound
    # (lowbit.kernels.fast: activation rounding only) of its dequantized float32 result.
    checked: list[str] = []

    def check(name: str, layer: QuantLinear, args: tuple[Any, ...], y: torch.Tensor) -> None:
        x = args[0]
        if isinstance(layer, QuantConv2d1x1):
            x, y = x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)  # [B, H, W, C]: channels are the features
        x2 = x.reshape(-1, layer.in_features).double()  # [M, K]
        if layer.input_scale is not None:
            x2 = x2 / layer.input_scale.double()
        w = layer.dequantized_weight().double()  # [N, K]
        ref = F.linear(x2, w, None if layer.bias is None else layer.bias.double())
        err = (y.reshape(-1, layer.out_features).double() - ref).abs()
        bound = fast.error_bound(x2, w, fast.prepared(layer).act_block) + 1e-5 * (x2.abs() @ w.abs().T) + 1e-6
        assert torch.all(err <= bound), f"{name}: max excess {(err - bound).max().item():.3g}"
        checked.append(name)

    hooks = [m.register_forward_hook(lambda mod, a, y, n=n: check(n, mod, a, y)) for n, m in layers.items()]
    with torch.no_grad():
        img, ref_img = loaded.encode_image(PIX), model.encode_image(PIX)
        txt, ref_txt = loaded.encode_text(TOK), model.encode_text(TOK)
    for h in hooks:
        h.remove()
    assert set(checked) == set(layers)
    # End to end (three to four packed layers deep) the per-layer rounding stays at the percent level.
    for y, ref in ((img, ref_img), (txt, ref_txt)):
        rel = ((y - ref).norm() / ref.norm()).item()
        assert 0 < rel < 2e-2, rel


def test_unknown_backend_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.errors import LowbitError

    _, out = _quantized(tmp_path)
    monkeypatch.setattr(ckpt, "default_float_builder", build)
    with pytest.raises(LowbitError, match="unknown linear backend 'gpu'"):
        load_model(str(out), backend="gpu")
