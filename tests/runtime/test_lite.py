"""The torch-free runtime (``lowbit.runtime``): a packed checkpoint run by ``LiteLM`` on the native library equals
the torch engine (``LeanDecoder``) on the same checkpoint -- one-token steps bit for bit on every ISA at 1 and 2
threads, the prefill to float32 rounding (its attention is the kernels' per-row attention, not torch's SDPA),
greedy tokens equal -- runs in a process that never imports torch, and refuses what it does not run in one line.

Tiny random models of odd widths (hidden 72: a partial K-block; MLP 100; head_dim 18; vocab 260: a partial tile).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.runtime import LiteLM, native
from tests.models.causal_lm_tiny import save_tiny_causal_lm

ODD = {"hidden_size": 72, "intermediate_size": 100, "num_attention_heads": 4, "num_key_value_heads": 2}
CASES = {  # name -> (model_type, recipe): symmetric / per-channel / asymmetric with biases / 3-bit, untied head /
    # codes with float group minima
    "llama-w4g32": ("llama", "language@embedding=w8g32,language=w4g32"),
    "llama-w8": ("llama", "language@embedding=w8g32,language=w8"),
    "qwen2-w2g64a": ("qwen2", "language@embedding=w4g32a,language=w2g64a"),
    "mistral-w3g32": ("mistral", "language@embedding=w8g32,language=w3g32"),
    "llama-w4g32-minmax": ("llama", "language@embedding=w8g32,language=w4g32:minmax"),  # offset storage (Q4_1's grid)
}
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 116, 105, 110, 121, 33]  # 13 tokens: the panel GEMM (> 4 rows)


def needs_native() -> None:
    """Skip where the native library cannot be built (no C++ compiler), as the kernel tests skip without theirs."""
    try:
        native.library()
    except LowbitError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    needs_native()
    root = tmp_path_factory.mktemp("lite")
    out = {}
    for name, (model_type, recipe) in CASES.items():
        model = lowbit.load(str(save_tiny_causal_lm(model_type, root / f"{name}-float", **ODD)))
        report = lowbit.quantize(model, recipe, progress=False)
        out[name] = lowbit.save(model, root / name, report)
    return out


def lean(path: Path):
    from lowbit.models.lean_decode import LeanDecoder

    return LeanDecoder(lowbit.load(str(path)).language)


@pytest.fixture()
def restore_isa_and_threads():
    from lowbit.kernels import fast

    isa, lib_isa, threads, lib_threads = fast.current_isa(), native.current_isa(), torch.get_num_threads(), \
        native.get_threads()
    yield
    fast.set_isa(isa)
    native.set_isa(lib_isa)
    torch.set_num_threads(threads)
    native.set_threads(lib_threads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_is_bit_equal_to_the_torch_engines_native_step(checkpoints: dict[str, Path], name: str,
                                                            restore_isa_and_threads: None) -> None:
    """From the same state (the torch prefill's KV cache and RoPE tables copied in), every one-token step's
    logits are equal bit for bit: on every ISA of this CPU, at 1 and 2 threads."""
    from lowbit.kernels import fast

    lm = LiteLM.load(checkpoints[name])
    engine = lean(checkpoints[name])
    ids = torch.tensor([PROMPT])
    assert torch.equal(torch.from_numpy(lm.embed(PROMPT)), engine.embed(ids)[0])  # the gathered rows, dequantized
    for isa in native.available_isas():
        fast.set_isa(isa)
        native.set_isa(isa)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            native.set_threads(threads)
            first = int(engine.prefill(ids, max_len=len(PROMPT) + 8).argmax())
            assert engine._stack is not None and engine._stack.has_head  # the native step runs (and the head)
            lm.reset(len(PROMPT) + 8)
            lm.k_cache[...] = engine.k_cache.numpy()
            lm.v_cache[...] = engine.v_cache.numpy()
            lm.cos, lm.sin = engine.cos.numpy().copy(), engine.sin.numpy().copy()
            lm.pos, lm.fill[:] = engine.pos, engine.fill
            token = first
            for _ in range(8):
                want = engine.step(torch.tensor([token]))[0].numpy()
                got = lm.step(token)
                assert np.array_equal(got, want), (isa, threads)
                token = int(want.argmax())


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_matches_and_greedy_tokens_equal(checkpoints: dict[str, Path], name: str) -> None:
    """The lite prefill runs the torch engine's prefill ops on the same kernels (panel GEMM, the kernels' causal
    prefill attention): bit-equal logits and KV cache given the same RoPE tables; with its own tables (at most
    one ulp from torch's float32 cos / sin) equal to float32 rounding. 24 greedy tokens are the torch engine's."""
    lm = LiteLM.load(checkpoints[name])
    engine = lean(checkpoints[name])
    ids = torch.tensor([PROMPT])
    want = engine.prefill(ids, max_len=64)[0].numpy()
    got = lm.prefill(PROMPT, max_len=64)
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-4
    cos, sin = engine.cos.numpy(), engine.sin.numpy()
    assert np.all(np.abs(lm.cos[:len(cos)] - cos) <= np.spacing(np.abs(cos)))
    lm.cos, lm.sin = cos.copy(), sin.copy()  # torch's tables: the prefill is then the torch prefill, bit for bit
    assert np.array_equal(lm.prefill(PROMPT, max_len=64), want)
    assert np.array_equal(lm.k_cache[:, :, :, :len(PROMPT)], engine.k_cache[:, :, :, :len(PROMPT)].numpy())
    new = engine.generate(ids, max_new_tokens=24).tokens[0].tolist()
    assert lm.generate(PROMPT, 24) == new
    assert list(lm.stream(PROMPT, 24)) == new


def test_sampling_chat_and_bad_options(checkpoints: dict[str, Path]) -> None:
    lm = LiteLM.load(checkpoints["llama-w4g32"])
    a = lm.generate(PROMPT, 12, temperature=0.9, top_k=20, top_p=0.9, seed=3)
    assert a == lm.generate(PROMPT, 12, temperature=0.9, top_k=20, top_p=0.9, seed=3)  # seeded: reproducible
    assert all(0 <= t < 260 for t in a)
    stops = lm.stop_ids()
    assert 257 in stops  # config / generation_config eos_token_id
    assert lm.chat_ids("hi there") == lowbit.load(str(checkpoints["llama-w4g32"])).prompt_ids("hi there")  # as HF's
    assert isinstance(lm.chat("hi", max_new_tokens=6), str)
    with pytest.raises(LowbitError, match="max_new_tokens must be >= 1"):
        lm.generate(PROMPT, 0)
    with pytest.raises(LowbitError, match="top_p must be in"):
        lm.generate(PROMPT, 4, temperature=1.0, top_p=0.0)
    with pytest.raises(LowbitError, match=r"token ids must be in \[0, 260\)"):
        lm.prefill([1, 999])
    with pytest.raises(LowbitError, match="past the"):
        lm.prefill(PROMPT, max_len=len(PROMPT))
        lm.step(1)
    with pytest.raises(LowbitError, match="not available on this CPU"):
        native.set_isa("neon")


def test_runs_in_a_process_without_torch(checkpoints: dict[str, Path]) -> None:
    code = ("import sys; from lowbit.runtime import LiteLM; lm = LiteLM.load(sys.argv[1], threads=2); "
            "out = lm.generate(lm.chat_ids('hello'), 8); text = lm.chat('hello', max_new_tokens=4); "
            "print(len(out), 'torch' in sys.modules, 'transformers' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(lowbit.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, str(checkpoints["llama-w4g32"])], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["8", "False", "False"]


def edited(src: Path, dst: Path, manifest=None, config=None) -> Path:
    shutil.copytree(src, dst)
    for name, edit in (("manifest.json", manifest), ("architecture/config.json", config)):
        if edit is not None:
            data = json.loads((dst / name).read_text())
            edit(data)
            (dst / name).write_text(json.dumps(data))
    return dst


def test_refusals_are_one_line(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    src = checkpoints["llama-w4g32"]
    cases = [
        (edited(src, tmp_path / "phi", config=lambda c: c.update(model_type="phi3")), "does not run model_type 'phi3'"),
        (edited(src, tmp_path / "rope", config=lambda c: c.update(rope_scaling={"rope_type": "llama3"},
                                                                  rope_parameters=None)), "rope_type is 'llama3'"),
        (edited(src, tmp_path / "kind", manifest=lambda m: m["modules"]["language.model.layers.1.mlp.up_proj"].update(
            kind="superblock_linear")), "stored as kind 'superblock_linear'"),
        (edited(src, tmp_path / "bits", manifest=lambda m: m["modules"]["language.model.layers.0.self_attn.o_proj"]
                .update(bits=5)), "5-bit"),
        (edited(src, tmp_path / "float", manifest=lambda m: m["modules"].pop("language.lm_head")),
         "module lm_head is not packed"),
        (edited(src, tmp_path / "family", manifest=lambda m: m["architecture"].update(family="llava")),
         "holds family 'llava'"),
        (tmp_path / "nowhere", "is not a checkpoint directory"),
    ]
    weights = edited(src, tmp_path / "noweights")
    (weights / "model.safetensors").unlink()
    noconfig = edited(src, tmp_path / "noconfig")
    (noconfig / "architecture" / "config.json").unlink()
    truncated = edited(src, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    cases += [(weights, "weights are missing"), (noconfig, "config.json is missing"),
              (truncated, "not a complete safetensors file")]
    for path, message in cases:
        with pytest.raises(LowbitError, match=message) as info:
            LiteLM.load(path)
        assert "\n" not in str(info.value)


def test_builder_key_follows_the_sources_and_a_missing_compiler_is_one_line(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    sources = shutil.copytree(native.SOURCE_DIR, tmp_path / "cpu")
    key = native.source_digest(sources)
    assert native.source_digest(sources) == key
    (sources / "engine.cpp").write_text((sources / "engine.cpp").read_text() + "\n// changed\n")
    assert native.source_digest(sources) != key
    assert native.build_dir(sources).name.endswith(native.source_digest(sources))
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(native.COMPILER_ENV, "no-such-compiler-xyz")
    with pytest.raises(LowbitError, match="needs a C.. compiler"):
        native.library_path(sources)
    assert not (native.build_dir(sources) / native.LIB_NAME).exists()


def test_cli_chat_lite_and_its_refusals(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from lowbit.cli import main

    path = str(checkpoints["llama-w4g32"])
    assert main(["chat", path, "hi", "--lite", "--no-stream", "--max-new-tokens", "4"]) == 0
    want = LiteLM.load(path).chat("hi", max_new_tokens=4)
    assert capsys.readouterr().out == want + "\n"
    assert main(["chat", path, "hi", "--lite", "--image", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "does not take --image" in err and len(err.strip().splitlines()) == 1
    assert main(["chat", path + "-missing", "hi", "--lite"]) == 2


@pytest.mark.parametrize(("bits", "group", "symmetric", "method"),
                         [(4, 64, True, "rtn"), (8, None, True, "rtn"), (3, 32, False, "rtn"), (4, 32, True, "minmax")])
def test_c_abi_weight_equals_the_torch_binding(bits: int, group: int | None, symmetric: bool, method: str) -> None:
    """A weight made through the C ABI over fast.prepare's tiles computes the binding's outputs bit for bit (odd
    N = 37 and K = 100: a partial tile and K-block), one row (the fused path) and seven (the panel GEMM)."""
    from lowbit.kernels import fast
    from lowbit.quant.methods import QuantContext, QuantSpec, get_method

    g = torch.Generator().manual_seed(bits)
    packed = get_method(method).quantize_weight(torch.randn(37, 100, generator=g), QuantSpec(bits, group, symmetric),
                                                QuantContext(), {}).packed
    needs_native()
    handle = fast.prepare(packed)
    if handle.call is None:
        pytest.skip(f"kernels unavailable: {handle.reason}")
    lib = native.library()
    tiles, scales = handle.tiles.numpy(), handle.scales.view(torch.int16).numpy()
    zeros = None if handle.zeros is None else handle.zeros.numpy()
    mins = None if handle.mins is None else handle.mins.view(torch.int16).numpy()  # minmax: offset storage's minima
    assert (mins is not None) == (method == "minmax")
    weight = lib.lowbit_weight_new(tiles.ctypes.data, tiles.size, scales.ctypes.data, scales.shape[0],
                                   scales.shape[1], None if zeros is None else zeros.ctypes.data, None,
                                   handle.zero_const, handle.cb, int(handle.full_byte), 37, 100, handle.group_blocks,
                                   handle.act_blocks, None if mins is None else mins.ctypes.data)
    native.check(weight)
    try:
        for m in (1, 7):
            x = torch.randn(m, 100, generator=g)
            y = np.empty((m, 37), np.float32)
            native.check(lib.lowbit_weight_compute(weight, x.numpy().ctypes.data, m, y.ctypes.data))
            assert np.array_equal(y, handle.call(x).numpy())
    finally:
        lib.lowbit_weight_free(weight)
    with pytest.raises(LowbitError, match="group blocks do not tile K"):
        native.check(lib.lowbit_weight_new(tiles.ctypes.data, tiles.size, scales.ctypes.data, scales.shape[0],
                                           scales.shape[1], None, None, 8.0, handle.cb, 0, 37, 100, 0, 1, None))
