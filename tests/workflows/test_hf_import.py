"""GPTQ / AWQ / compressed-tensors checkpoints on lowbit's kernels: each layer equals the producer's published
dequantization (a pinned fixture, and writers built from the published layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.quant_linear import set_backend
from lowbit.models.hf_quantized import AWQ_ORDER, awq_layer, gptq_layer, load_quantized_hf
from lowbit.quant.apply import quantize_
from lowbit.workflows.export import export
from tests.workflows.test_export_gguf import TinyChat

FIXTURE = Path(__file__).with_name("fixtures") / "gptq_awq_tiny.json"


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The published packing, written plainly: ``32 // bits`` codes per int32 along ``dim``, LSB first."""
    per = 32 // bits
    c = codes.to(torch.int64)
    c = c if dim == 1 else c.t()
    rows, cols = c.shape
    out = torch.zeros(rows, cols // per, dtype=torch.int64)
    for j in range(cols):
        out[:, j // per] |= c[:, j] << (bits * (j % per))
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out if dim == 1 else out.t().contiguous()


def gptq_tensors(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int):
    """q [K, N], zeros [G, N] (true zero points), scales [G, N] -> GPTQ v1 tensors (zeros stored minus one)."""
    return pack_int32(q, bits, 0), pack_int32((zeros - 1) & ((1 << bits) - 1), bits, 1), scales.half(), g_idx


def gptq_reference(q, zeros, scales, g_idx) -> torch.Tensor:
    """w[n, k] = scales[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k]: the published formula, [N, K]."""
    g = g_idx.long()
    return (scales.half().float()[g] * (q.float() - zeros.float()[g])).t()


def awq_tensors(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor):
    def interleave(x: torch.Tensor) -> torch.Tensor:  # column j*8 + i holds original column j*8 + AWQ_ORDER[i]
        return x.view(x.shape[0], -1, 8)[..., list(AWQ_ORDER)].reshape(x.shape)

    return pack_int32(interleave(q), 4, 1), pack_int32(interleave(zeros), 4, 1), scales.half()


def random_case(k: int, n: int, group: int, bits: int, seed: int, desc_act: bool):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (k, n), generator=g)
    zeros = torch.randint(1, 1 << bits, (k // group, n), generator=g)
    scales = torch.rand(k // group, n, generator=g) * 0.1 + 0.01
    g_idx = torch.arange(k) // group
    if desc_act:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return q, zeros, scales, g_idx.to(torch.int32)


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("bits", [4, 8, 2])
def test_gptq_layer_equals_the_published_dequantization(bits: int, desc_act: bool) -> None:
    q, zeros, scales, g_idx = random_case(64, 48, 16, bits, bits, desc_act)
    layer = gptq_layer(*gptq_tensors(q, zeros, scales, g_idx, bits), bits)
    set_backend(layer, "reference")
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    want = x @ gptq_reference(q, zeros, scales, g_idx).t()
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)  # summation order differs (desc_act)
    assert (type(layer).__name__ == "PermutedQuantLinear") == desc_act


def test_gptq_symmetric_checkpoint_becomes_lowbits_int4() -> None:
    q, _, scales, g_idx = random_case(64, 16, 32, 4, 0, False)
    layer = gptq_layer(*gptq_tensors(q, torch.full((2, 16), 8), scales, g_idx, 4), 4)
    assert layer.symmetric and layer.zeros is None and layer.group_size == 32


def test_awq_layer_equals_the_published_dequantization() -> None:
    q, zeros, scales, _ = random_case(64, 48, 32, 4, 3, False)
    layer = awq_layer(*awq_tensors(q, zeros, scales), 32)
    set_backend(layer, "reference")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ gptq_reference(q, zeros, scales, torch.arange(64) // 32).t(),
                               rtol=1e-5, atol=1e-5)


def test_pinned_fixture() -> None:
    """Fixed int32 words and the float weights they stand for (written once from the published formulas)."""
    case = json.loads(FIXTURE.read_text())
    for name, build in (("gptq", lambda t: gptq_layer(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)),
                        ("awq", lambda t: awq_layer(t["qweight"], t["qzeros"], t["scales"], 8))):
        tensors = {k: torch.tensor(v, dtype=torch.float16 if k == "scales" else torch.int32)
                   for k, v in case[name].items() if k != "weight"}
        layer = build(tensors)
        set_backend(layer, "reference")
        torch.testing.assert_close(layer(torch.eye(16)).t(), torch.tensor(case[name]["weight"]), rtol=0, atol=1e-6)


def write_gptq_dir(model: TinyChat, out: Path, desc_act: bool) -> dict[str, torch.Tensor]:
    """A tiny LM saved in the GPTQ v1 layout (4-bit g16): returns the float weights the file stands for."""
    from safetensors.torch import save_file

    lm = model.language
    state = {k: v.contiguous() for k, v in lm.state_dict().items() if "lm_head" not in k}
    weights = {}
    for i, (path, module) in enumerate(lm.named_modules()):
        if not isinstance(module, torch.nn.Linear) or path == "lm_head":
            continue
        k, n = module.in_features, module.out_features
        q, zeros, scales, g_idx = random_case(k, n, 16, 4, i, desc_act)
        scales = scales * 0.3
        del state[f"{path}.weight"]
        state[f"{path}.qweight"], state[f"{path}.qzeros"], state[f"{path}.scales"], state[f"{path}.g_idx"] = \
            gptq_tensors(q, zeros, scales, g_idx, 4)
        weights[path] = gptq_reference(q, zeros, scales, g_idx)
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    config = {**lm.config.to_dict(), "architectures": [type(lm).__name__]}  # as save_pretrained writes it
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": desc_act,
                                     "sym": False, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(config))
    return weights


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_directory_loads_and_runs_on_the_kernels(tmp_path: Path, desc_act: bool) -> None:
    model = TinyChat()
    weights = write_gptq_dir(model, tmp_path / "gptq", desc_act)
    loaded, report = load_quantized_hf(tmp_path / "gptq")
    assert report == {"method": "gptq", "packed_layers": 2 * 7}
    with torch.no_grad():
        for path, w in weights.items():
            model.language.get_submodule(path).weight.copy_(w)
    ids = torch.tensor([model.tokenizer("the quick brown fox answers")["input_ids"]])
    set_backend(loaded, "reference")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.language(ids).logits, rtol=1e-4, atol=1e-4)


def test_gptq_desc_act_import_saves_as_a_lowbit_checkpoint(tmp_path: Path) -> None:
    """The permuted (desc_act) layers keep their input order through ``lowbit.save`` / ``lowbit.load``."""
    import lowbit
    from tests.workflows.test_gguf_import import assert_resaves_exactly

    model = TinyChat()
    write_gptq_dir(model, tmp_path / "gptq", desc_act=True)
    model.tokenizer.save_pretrained(str(tmp_path / "gptq"))
    loaded = lowbit.load(str(tmp_path / "gptq"))
    ids = torch.tensor([model.tokenizer("the quick brown fox answers")["input_ids"]])
    assert_resaves_exactly(loaded, tmp_path / "saved", ids, 2 * 7)
    manifest = json.loads((tmp_path / "saved" / "manifest.json").read_text())
    assert {m["kind"] for m in manifest["modules"].values()} == {"permuted_linear"}


def test_compressed_tensors_export_loads_back(tmp_path: Path) -> None:
    model = TinyChat()
    quantize_(model.language, "model=w4g32", progress=False)
    export(model, "hf", tmp_path / "ct")
    loaded, report = load_quantized_hf(tmp_path / "ct")
    assert report["packed_layers"] == 2 * 7 + 1
    set_backend(model.language, "reference")
    set_backend(loaded, "reference")
    ids = torch.tensor([model.tokenizer("the quick brown fox answers")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.language(ids).logits)


def write_compressed_tensors_dir(model: TinyChat, out: Path, bits: int, group: int | None) -> None:
    """``model`` quantized and saved by compressed-tensors' own library: asymmetric pack-quantized (zero points),
    min-max ranges per group (``group``) or per channel (None), fp16 like a real checkpoint."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    lm = model.language.half()
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group" if group else "channel",
                            group_size=group)
    apply_quantization_config(lm, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, format="pack-quantized",
        ignore=["lm_head"]))
    for module in lm.modules():
        if hasattr(module, "weight_zero_point"):
            w = module.weight.detach().float()
            w = w.reshape(w.shape[0], -1, group or w.shape[1])
            scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(lm)
    compressor.compress_model(lm)
    lm.save_pretrained(out)
    compressor.update_config(str(out))
    model.tokenizer.save_pretrained(str(out))


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (3, 32), (8, None)])
def test_compressed_tensors_zero_points_equal_its_own_dequantization(tmp_path: Path, bits: int,
                                                                     group: int | None) -> None:
    """An asymmetric pack-quantized checkpoint written by compressed-tensors itself: every layer imported packed
    with its zero points equals compressed-tensors' own decompression, and the model runs on the kernels."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    import lowbit

    write_compressed_tensors_dir(TinyChat(), tmp_path / "ct", bits, group)
    state = load_file(str(tmp_path / "ct" / "model.safetensors"))
    scheme = QuantizationScheme(**{**json.loads((tmp_path / "ct" / "config.json").read_text())[
        "quantization_config"]["config_groups"]["group_0"], "format": None})
    loaded = lowbit.load(str(tmp_path / "ct"))
    assert loaded.lowbit_import == {"method": "compressed-tensors", "packed_layers": 2 * 7}
    for path, module in loaded.language.named_modules():
        if not hasattr(module, "packed"):
            continue
        assert module.zeros is not None and module.bits == bits
        mine = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == path}
        mine["weight_scale"] = mine["weight_scale"].float()  # fp16 -> fp32 exactly: its formula without fp16 rounding
        theirs = PackedQuantizationCompressor.decompress(mine, scheme)["weight"]
        assert torch.equal(module.packed.dequantize(), theirs), path
    ids = torch.tensor([loaded.tokenizer("the quick brown fox answers")["input_ids"]])
    set_backend(loaded.language, "reference")
    with torch.no_grad():
        ref = loaded.language(ids).logits
        set_backend(loaded.language, "cpu")  # int8 activations: within the kernels' stated bound
        got = loaded.language(ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.05


def test_bad_checkpoints_are_one_line(tmp_path: Path) -> None:
    model = TinyChat()
    write_gptq_dir(model, tmp_path / "gptq", False)
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "bitsandbytes"
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="quant_method 'bitsandbytes'; lowbit imports gptq, awq"):
        load_quantized_hf(tmp_path / "gptq")
    config["quantization_config"]["quant_method"] = "gptq"
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.qzeros"]
    save_file(state, str(tmp_path / "gptq" / "model.safetensors"))
    with pytest.raises(LowbitError, match=r"layer model\.layers\.1\.mlp\.up_proj lacks tensor"):
        load_quantized_hf(tmp_path / "gptq")
