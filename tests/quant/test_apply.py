"""quantize_ on a tiny model: replacement, accuracy, report, strictness and warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.kernels.quant_linear import QuantConv2d1x1, QuantLinear, QuantWeightParam, is_quantized
from lowbit.quant.apply import layer_kind, quantize_
from lowbit.quant.recipe import Recipe, load_recipe
from lowbit.quant.report import NO_OPT_IN, NO_RULE, NOT_A_LAYER, SKIPPED, UNSUPPORTED


class Tiny(nn.Module):
    """Embedding -> Linear -> LayerNorm -> 1x1 conv -> 3x3 depthwise conv -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 32)
        self.fc1 = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.pw = nn.Conv2d(64, 48, 1)
        self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48)
        self.head = nn.Linear(48, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        h = self.norm(self.fc1(self.embed(ids)))  # [B, 16, 64]
        h = h.transpose(1, 2).reshape(b, 64, 4, 4)  # [B, 64, 4, 4]
        h = self.dw(torch.relu(self.pw(h)))  # [B, 48, 4, 4]
        return self.head(h.mean(dim=(2, 3)))  # [B, 16]


IDS = torch.randint(0, 10, (5, 16), generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_rtn_w4g32_replaces_layers_and_stays_close() -> None:
    model = Tiny().eval()
    with torch.no_grad():
        ref = model(IDS)
    report = quantize_(model, "*=w4g32", progress=False)
    assert isinstance(model.fc1, QuantLinear) and isinstance(model.head, QuantLinear)
    assert isinstance(model.pw, QuantConv2d1x1)
    assert isinstance(model.dw, QuantWeightParam) and isinstance(model.dw, nn.Conv2d)  # original forward kept
    assert "weight" not in model.dw.state_dict() and "qweight" in model.dw.state_dict()
    with torch.no_grad():
        out = model(IDS)
    # 4-bit g32 RTN: ~6% relative weight error per layer and ~6% at the output (measured); bound 10%.
    assert _rel(out, ref) < 0.1, _rel(out, ref)
    assert [m.name for m in report.modules] == ["fc1", "pw", "dw", "head"]
    assert [m.kind for m in report.modules] == ["linear", "conv1x1", "conv", "linear"]
    for m in report.modules:
        assert 0 < m.weight_error < 0.1
        assert m.packed_bytes < m.fp32_bytes
    assert report.modules[0].bits_per_weight == pytest.approx(4 + 16 / 32)  # codes + one fp16 scale per 32


def test_8bit_is_much_closer_than_4bit() -> None:
    model = Tiny().eval()
    with torch.no_grad():
        ref = model(IDS)
        quantize_(model, "*=w8", progress=False)
        assert _rel(model(IDS), ref) < 0.02


def test_report_lists_float_modules_with_reasons() -> None:
    model = Tiny()
    report = quantize_(model, "model/dw=skip,model=w4g32", progress=False)
    kept = {f.name: f for f in report.float_modules}
    # an embedding table is a quantizable layer now, matched only by rules naming the embedding kind
    assert kept["embed"].category == NO_OPT_IN and "embedding" in kept["embed"].reason
    assert kept["norm"].category == NOT_A_LAYER and "LayerNorm" in kept["norm"].reason
    assert kept["dw"].category == SKIPPED and "rule 0" in kept["dw"].reason
    assert not is_quantized(model.dw)
    md = report.markdown()
    assert "| model/dw |" in md and "skipped by rule 0" in md
    d = report.to_dict()
    assert d["totals"]["total"]["quantized_layers"] == 3
    assert d["totals"]["model"]["float_params"] == sum(f.params for f in report.float_modules)


def test_strict_raises_for_unmatched_layers_only() -> None:
    with pytest.raises(LowbitError, match=r"strict: 1 weight layer.*model/head"):
        quantize_(Tiny(), "model/fc*=w4,model/pw=w4,model/dw=skip", strict=True, progress=False)
    # skip rules and norms/embeddings are deliberate: strict accepts them
    report = quantize_(Tiny(), "model/dw=skip,*=w4g32", strict=True, progress=False)
    assert {f.category for f in report.float_modules} == {NOT_A_LAYER, NO_OPT_IN, SKIPPED}
    report = quantize_(Tiny(), "model/fc*=w4", progress=False)
    assert {f.name for f in report.float_modules if f.category == NO_RULE} == {"pw", "dw", "head"}


def test_unmatched_rule_warns() -> None:
    with pytest.warns(UserWarning, match=r"rule 0 \(vision=w4:rtn\) matches no module"):
        quantize_(Tiny(), "vision=w4,*=w8", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(Tiny(), "*=w8", progress=False)
        # with_method's rule for the layers of other kinds (none in an all-Linear model) is optional: no warning
        derived = load_recipe("*=w4g32").with_method("minmax")
        assert [r.optional for r in derived.rules] == [False, True]
        assert Recipe.from_dict(derived.to_dict()).rules == derived.rules  # round-trips
        quantize_(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)), derived, progress=False)


def test_calibration_required_and_already_quantized() -> None:
    with pytest.raises(LowbitError, match="needs calibration data"):
        quantize_(Tiny(), "*=w4:gptq", progress=False)
    model = Tiny()
    quantize_(model, "*=w8", progress=False)
    with pytest.raises(LowbitError, match="already quantized"):
        quantize_(model, "*=w8", progress=False)


def test_custom_forward_subclasses() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    class PaddedConv(nn.Conv2d):  # custom forward: not assumed pointwise-compatible, keeps its forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))

    assert layer_kind(Scaled(4, 4))[0] is None
    assert layer_kind(PaddedConv(4, 4, 1))[0] == "conv"
    assert layer_kind(nn.Conv2d(4, 4, 1, stride=2))[0] == "conv"
    assert layer_kind(nn.Conv2d(4, 4, 1))[0] == "conv1x1"
    model = nn.Sequential(PaddedConv(8, 4, 1), Scaled(6, 3))
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        ref = model(x)
        report = quantize_(model, "*=w8", progress=False)
        assert _rel(model(x), ref) < 0.02
    assert [(f.name, f.category) for f in report.float_modules] == [("1", UNSUPPORTED)]


def test_multihead_attention_out_proj_reads_quantized_weight() -> None:
    attn = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = attn(x, x, x, need_weights=False)[0]
        report = quantize_(nn.Sequential(attn), "*=w8", progress=False)
        assert isinstance(attn.out_proj, QuantLinear)
        assert _rel(attn(x, x, x, need_weights=False)[0], ref) < 0.02
    assert "in_proj_weight" in report.float_modules[0].reason
