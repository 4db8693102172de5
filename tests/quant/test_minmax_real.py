"""On the real LLM (slow): SmolLM2-135M-Instruct ships as GGUF Q4_1, so ``minmax`` at 4 bits, group 32 must
re-pack every linear of its 30 blocks bit for bit (the reason the VLM benchmark's w4 language row is lossless)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_minmax_w4g32_repacks_every_smollm2_block_linear_bit_exactly() -> None:
    from lowbit.models.smollm import load_smollm2
    from lowbit.quant.minmax import minmax_pack
    from lowbit.quant.primitives import QuantSpec, fake_quantize

    lm, _ = load_smollm2()
    linears = [(n, m) for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert len(linears) == 30 * 7
    for name, module in linears:
        w = module.weight.detach()
        assert torch.equal(minmax_pack(w, QuantSpec(4, 32)).dequantize(), w), name
    # The integer-zero grid of the same width and group does not hold them: every layer moves.
    w = linears[0][1].weight.detach()
    assert (fake_quantize(w, QuantSpec(4, 32, symmetric=False)) - w).abs().max() > 0
