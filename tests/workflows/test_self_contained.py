"""Self-contained packed checkpoints: built from the directory alone (moved, float source gone, any working
directory) on a weightless skeleton, tied tensors stored once, fp16 floats, re-saved byte for byte, and bad
directories refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbit
import lowbit.workflows.checkpoint as ckpt
from lowbit.errors import LowbitError
from lowbit.kernels.quant_embedding import QuantEmbedding
from tests.models.conftest import write_tiny
from tests.models.llava_tiny import write_tiny_llava, write_tiny_lm

QUESTION = "what is this item ?"
PACKED = ("qweight", "scales", "zeros", "input_scale")


def _image(colour: tuple[int, int, int] = (30, 60, 220)) -> Image.Image:
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    img.paste(colour, (8, 8, 40, 56))
    return img


def forbid_float_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way of reading a float model or a packaged asset fail loudly."""
    import transformers

    from lowbit.models import lit, llava, llava_hf, smollm, towers

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a float source was read while loading a packed checkpoint")

    for module, name in [(towers, "efficientnet_lite0_weights"), (towers, "minilm_dir"), (lit, "minilm_dir"),
                         (lit, "packaged_heads_path"), (smollm, "load_smollm2"), (smollm, "gguf_path"),
                         (llava, "packaged_projector_path"), (llava, "_causal_lm"), (llava_hf, "load_hf_llava"),
                         (ckpt, "default_float_builder")]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def move_away(out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *sources: Path) -> Path:
    """Copy ``out`` elsewhere, delete it and the float ``sources``, and work from yet another directory."""
    moved = tmp_path / "moved" / "ckpt"
    shutil.copytree(out, moved)
    for gone in (out, *sources):
        shutil.rmtree(gone)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return moved


def assert_same_bytes(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def assert_in_place(model: torch.nn.Module) -> None:
    """Nothing left on the meta device; the manifest kept for re-saving."""
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lowbit_manifest["format_version"] == ckpt.FORMAT_VERSION


def assert_file_backed(model: torch.nn.Module, weights: Path) -> None:
    """Every packed buffer lies in a memory mapping of ``weights`` (loaded in place, not copied)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(weights.resolve())):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi))
    assert spans, "the weights file is not memory-mapped"
    packed = [t for n, t in model.named_buffers() if n.rsplit(".", 1)[-1] in PACKED]
    assert packed and all(any(lo <= t.data_ptr() < hi for lo, hi in spans) for t in packed)


def _outputs(model: Any, pixels: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(model.tokenize(texts))


# --- one test per family: moved, float source gone, same outputs, byte-identical re-save -------------------------
@pytest.mark.parametrize("model_type", ["clip", "siglip"])
def test_clip_family_loads_from_its_directory_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    model_type: str) -> None:
    src = write_tiny(tmp_path / "float", model_type)
    model = lowbit.load(str(src))
    report = lowbit.quantize(model, "vision=w4g32,text=w4g32,projector=w8,floats=fp16", progress=False)
    out = lowbit.save(model, tmp_path / "q", report=report)
    pixels, texts = model.preprocess([_image()]), ["a red circle", "a blue square on the left"]
    expected = _outputs(model, pixels, texts)
    assert sorted(json.loads((out / "manifest.json").read_text())["architecture"]["files"]) == [
        "model/config.json", "model/preprocessor_config.json", "model/tokenizer.json", "model/tokenizer_config.json"]

    moved = move_away(out, tmp_path, monkeypatch, src)
    forbid_float_sources(monkeypatch)
    loaded = lowbit.load(str(moved))
    assert_in_place(loaded)
    got = _outputs(loaded, loaded.preprocess([_image()]), texts)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    lowbit.save(loaded, tmp_path / "again")
    assert_same_bytes(moved, tmp_path / "again")


def test_hf_llava_loads_from_its_directory_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_tiny_llava(tmp_path / "float")
    model = lowbit.load(str(src))
    report = lowbit.quantize(model, "language=w4g16,vision=w8,projector=w8,floats=fp16", progress=False)
    answer = model.chat(_image(), QUESTION, max_new_tokens=6)
    out = lowbit.save(model, tmp_path / "q", report=report)

    moved = move_away(out, tmp_path, monkeypatch, src)
    forbid_float_sources(monkeypatch)
    loaded = lowbit.load(str(moved))
    assert_in_place(loaded)
    assert loaded.chat(_image(), QUESTION, max_new_tokens=6) == answer
    assert loaded.source["float_source"] == model.source  # provenance; loading never read it
    lowbit.save(loaded, tmp_path / "again")
    assert_same_bytes(moved, tmp_path / "again")


@pytest.fixture()
def builtin_style(tmp_path: Path) -> tuple[Any, Any, Path]:
    """A built-in style VLM (EfficientNet-Lite0 grid + Projector + a tied Llama), quantized with its embedding
    table and tied head packed, floats fp16, and saved."""
    from lowbit.models.llava import LlavaConfig, from_parts

    lm_dir = write_tiny_lm(tmp_path / "lm")
    model = from_parts("lit-fashion", str(lm_dir), LlavaConfig(image_size=64, output_stride=16))
    report = lowbit.quantize(model, "language@embedding=w8g32,language=w4g32,vision=w8,projector=w8,floats=fp16",
                             progress=False)
    return model, report, lowbit.save(model, tmp_path / "q", report=report)


def test_builtin_style_llava_loads_from_its_directory_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            builtin_style: tuple[Any, Any, Path]) -> None:
    model, _, out = builtin_style
    answer = model.chat(_image(), QUESTION, max_new_tokens=6)
    expected = _outputs(model, model.preprocess([_image()]), [QUESTION])
    arch = json.loads((out / "manifest.json").read_text())["architecture"]
    assert arch["family"] == "llava" and arch["record"]["vision"] == {"out_dim": 1280, "output_stride": 16}
    assert "language/chat_template.jinja" in arch["files"] or "language/tokenizer_config.json" in arch["files"]

    moved = move_away(out, tmp_path, monkeypatch, tmp_path / "lm")
    forbid_float_sources(monkeypatch)
    loaded = lowbit.load(str(moved))
    assert_in_place(loaded)
    assert_file_backed(loaded, moved / "model.safetensors")
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template  # the template travels with it
    assert loaded.vision.output_stride == 16 and loaded.config == model.config
    got = _outputs(loaded, loaded.preprocess([_image()]), [QUESTION])
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert loaded.chat(_image(), QUESTION, max_new_tokens=6) == answer
    lowbit.save(loaded, tmp_path / "again")
    assert_same_bytes(moved, tmp_path / "again")


def test_tied_tensors_are_stored_once_and_floats_as_fp16(builtin_style: tuple[Any, Any, Path]) -> None:
    model, _, out = builtin_style
    table, head = model.language.model.embed_tokens, model.language.lm_head
    assert isinstance(table, QuantEmbedding) and head.qweight is table.qweight  # the lead's tie, in memory
    storage = json.loads((out / "manifest.json").read_text())["storage"]
    assert storage["float_dtype"] == "fp16"
    assert storage["tied"] == {f"language.lm_head.{b}": f"language.model.embed_tokens.{b}"
                               for b in ("qweight", "scales", "zeros") if getattr(table, b) is not None}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    assert not set(storage["tied"]) & keys  # written once
    floats = {k: d for k, d in dtypes.items() if d in ("F16", "F32", "BF16") and k.rsplit(".", 1)[-1] not in PACKED}
    assert floats and set(floats.values()) == {"F16"}  # norms, biases, BatchNorm: fp16 on disk

    loaded = lowbit.load(str(out))
    table, head = loaded.language.model.embed_tokens, loaded.language.lm_head
    assert head.qweight is table.qweight and head.scales is table.scales  # re-tied: one tensor in memory
    state = loaded.state_dict()
    assert all(state[k].dtype == torch.float32 for k in floats)  # read back as float32, exactly
    reference = model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_floats_beyond_fp16_stay_float32(tmp_path: Path) -> None:
    """QAT's batch-norm moment matching can leave running variances near 1e13: as fp16 they were inf and every
    output NaN. Such a tensor stays float32 in memory and on disk; the others are fp16; a re-save is identical."""
    src = write_tiny(tmp_path / "float", "clip")
    model = lowbit.load(str(src))
    norm = model.model.vision_model.post_layernorm
    with torch.no_grad():
        norm.weight.mul_(1e9)  # beyond 65504 (the layer norm's output scale only)
    big = norm.weight.detach().clone()
    report = lowbit.quantize(model, "vision=w8,text=w8,floats=fp16", progress=False)
    assert torch.equal(norm.weight, big)  # not rounded to inf in memory either
    out = lowbit.save(model, tmp_path / "q", report=report)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    key = "model.vision_model.post_layernorm.weight"
    assert dtypes.pop(key) == "F32" and "F16" in dtypes.values()
    loaded = lowbit.load(str(out))
    assert torch.equal(loaded.state_dict()[key], big)
    pixels = model.preprocess([_image()])
    got, expected = _outputs(loaded, pixels, [QUESTION]), _outputs(model, pixels, [QUESTION])
    assert all(torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected, strict=True))
    lowbit.save(loaded, tmp_path / "again")
    assert_same_bytes(out, tmp_path / "again")


def test_a_tensor_left_on_meta_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_tiny(tmp_path / "float", "clip")
    model = lowbit.load(str(src))
    out = lowbit.save(model, tmp_path / "q", report=lowbit.quantize(model, "vision=w8", progress=False))
    real = ckpt._skeleton

    def ghostly(root: Path, architecture: dict[str, Any]) -> torch.nn.Module:
        skeleton = real(root, architecture)
        skeleton.register_buffer("ghost", torch.empty(3, device="meta"), persistent=False)
        return skeleton

    monkeypatch.setattr(ckpt, "_skeleton", ghostly)
    with pytest.raises(LowbitError, match="got no value .*first: ghost"):
        lowbit.load(str(out))


# --- bad directories: one line from the API, exit 2 and one line from the CLI -------------------------------------
def _manifest_edit(change: Any) -> Any:
    def edit(out: Path) -> None:
        manifest = json.loads((out / "manifest.json").read_text())
        change(manifest)
        (out / "manifest.json").write_text(json.dumps(manifest))

    return edit


def _truncate(out: Path) -> None:
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])


def _wrong_shape(out: Path) -> None:
    state = load_file(str(out / "model.safetensors"))
    key = next(k for k in state if k.endswith("layer_norm1.weight"))
    state[key] = torch.cat([state[key], state[key]])
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))


def _drop_config(out: Path) -> None:
    (out / "architecture" / "model" / "config.json").unlink()


BAD = {
    "truncated tensor file": (_truncate, "cannot read"),
    "missing tensor": (_manifest_edit(lambda m: m["storage"]["tied"].update({"extra.weight": "no.such.tensor"})),
                       "lacks"),
    "wrong shape": (_wrong_shape, "does not fit the rebuilt model"),
    "unknown format version": (_manifest_edit(lambda m: m.update(format_version=99)), "this lowbit reads 2"),
    "missing architecture file": (_drop_config, "lacks architecture/model/config.json"),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-ckpt")
    model = lowbit.load(str(write_tiny(root / "float", "clip")))
    return lowbit.save(model, root / "q", report=lowbit.quantize(model, "vision=w4g32,text=w8", progress=False))


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_directory_is_one_line(good_checkpoint: Path, tmp_path: Path, case: str) -> None:
    damage, message = BAD[case]
    out = shutil.copytree(good_checkpoint, tmp_path / "ckpt")
    damage(out)
    with pytest.raises(LowbitError, match=message) as err:
        lowbit.load(str(out))
    assert "\n" not in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", str(out), "--task", "fashion-mnist",
                           "--limit", "5"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


# --- the real built-in model -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lit_fashion_loads_from_its_directory_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = lowbit.load("lit-fashion")
    out = lowbit.save(model, tmp_path / "q", report=lowbit.quantize(model, "w4", progress=False))
    arch = json.loads((out / "manifest.json").read_text())["architecture"]
    assert arch["family"] == "lit" and "text/config.json" in arch["files"]
    images = [_image(), _image((200, 30, 30))]
    texts = ["a photo of a sneaker.", "a photo of a bag."]
    expected = _outputs(model, model.preprocess(images), texts)

    moved = move_away(out, tmp_path, monkeypatch)
    forbid_float_sources(monkeypatch)
    loaded = lowbit.load(str(moved))
    assert_in_place(loaded)
    assert_file_backed(loaded, moved / "model.safetensors")
    got = _outputs(loaded, loaded.preprocess(images), texts)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    lowbit.save(loaded, tmp_path / "again")
    assert_same_bytes(moved, tmp_path / "again")
