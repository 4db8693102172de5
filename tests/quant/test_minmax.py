"""``minmax``: the scale + float-minimum grid (``offset`` storage): lossless on Q4_1-style weights, tighter
than the integer-zero grid elsewhere, runs on the kernels within their bound, survives save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels import fast
from lowbit.kernels.offsets import OffsetLinear, OffsetPacked
from lowbit.quant.apply import quantize_
from lowbit.quant.minmax import minmax_pack
from lowbit.quant.primitives import QuantSpec, fake_quantize
from lowbit.quant.recipe import parse_short
from lowbit.workflows.checkpoint import load_quantized, save_quantized
from tests.quant.qat_tiny import TinyDual, tiny_data


def q41_like(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Weights on a Q4_1 grid: per block of 32, fp16 step d and minimum m, w = d * q + m with q in 0..15
    (both extremes used, as llama.cpp's quantizer makes them)."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-k // 32)
    d = (torch.rand(n, blocks, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(n, blocks, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (n, blocks, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    w = d[..., None] * q + m[..., None]  # [N, blocks, 32]
    return w.reshape(n, blocks * 32)[:, :k].contiguous()


def test_repacks_q4_1_weights_bit_exactly() -> None:
    w = q41_like(48, 256)
    packed = minmax_pack(w, QuantSpec(4, 32))
    assert isinstance(packed, OffsetPacked)
    assert torch.equal(packed.dequantize(), w)
    assert packed.nbytes * 8 / w.numel() == 5.0  # 4-bit codes + fp16 step + fp16 minimum per 32 weights


def test_tighter_than_the_integer_zero_grid_on_gaussian_weights() -> None:
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    for bits in (2, 3, 4):
        ours = (minmax_pack(w, QuantSpec(bits, 32)).dequantize() - w).norm()
        integer_zero = (fake_quantize(w, QuantSpec(bits, 32, symmetric=False)) - w).norm()
        assert ours < 0.97 * integer_zero, bits


def test_last_short_group_and_conv_shapes() -> None:
    w = torch.randn(5, 3, 3, 3)  # K = 27, groups 16 + 11
    packed = minmax_pack(w, QuantSpec(3, 16))
    deq = packed.dequantize()  # [N, K]
    assert packed.shape == (5, 3, 3, 3) and deq.shape == (5, 27)
    step = packed.scales.float()  # [N, G]
    err = (deq - w.reshape(5, 27)).abs()
    assert torch.all(err[:, :16] <= step[:, :1] / 2 * (1 + 1e-3) + 1e-7)
    assert torch.all(err[:, 16:] <= step[:, 1:] / 2 * (1 + 1e-3) + 1e-7)


def test_bad_specs_are_clear_errors() -> None:
    with pytest.raises(LowbitError, match="minmax needs 2 to 8 bits"):
        minmax_pack(torch.randn(4, 32), QuantSpec(4, 32, symmetric=False))
    with pytest.raises(LowbitError, match="minmax needs 2 to 8 bits"):
        minmax_pack(torch.randn(4, 32), QuantSpec(1, 32))


@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernel_path_matches_the_reference_within_the_kernel_bound(m: int) -> None:
    if not fast.is_available():
        pytest.skip(f"kernels unavailable: {fast.unavailable_reason()}")
    w = q41_like(40, 192, seed=2)
    packed = minmax_pack(w, QuantSpec(4, 32))
    layer = OffsetLinear.from_packed(packed, bias=torch.randn(40))
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(3))
    layer.backend = "reference"
    ref = layer(x).double()
    assert torch.allclose(ref, x.double() @ w.double().T + layer.bias.double(), atol=1e-4)
    layer.backend = "cpu"
    y = layer(x).double()
    handle = fast.prepare(packed)
    assert handle.mins is not None  # the minima run in the kernels, not beside them
    # The kernels' int8 activations (per row, blocks of act_block inputs, step max|x_b| / 127) are their only
    # approximation, minima included: |err| <= sum_b step_b / 2 * sum_{k in b} |W|.
    blocks = x.double().unflatten(-1, (-1, handle.act_block))  # [M, B, act_block]
    half_step = blocks.abs().amax(-1) / 127 / 2  # [M, B]
    w_abs = w.double().abs().unflatten(-1, (-1, handle.act_block)).sum(-1)  # [N, B]
    bound = half_step @ w_abs.T  # [M, N]
    slack = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-5
    assert torch.all((y - ref).abs() <= bound + slack)


def test_recipe_quantizes_and_checkpoint_round_trips(tmp_path: Path) -> None:
    model = TinyDual()
    recipe = parse_short("*=w4g16:minmax")
    report = quantize_(model, recipe, progress=False)
    assert {m.kind for m in report.modules} <= {"offset_conv", "offset_conv1x1", "offset_linear"}
    data = tiny_data(8, captions=True)
    pixels, tokens = model.preprocess(data.images), model.tokenize(data.captions)
    with torch.no_grad():
        before = torch.cat([model.encode_image(pixels), model.encode_text(tokens)])
    save_quantized(model, report, recipe, tmp_path / "ck")
    loaded = load_quantized(tmp_path / "ck", build_float=lambda source: TinyDual())
    with torch.no_grad():
        assert torch.equal(torch.cat([loaded.encode_image(pixels), loaded.encode_text(tokens)]), before)
