"""The dequantized SmolLM2-135M-Instruct asset: converted once, cached, and a working chat model."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_smollm2_cached_copy_loads_and_answers() -> None:
    from lowbit.models.smollm import converted_dir, load_smollm2

    lm, tokenizer = load_smollm2()
    assert (converted_dir() / "model.safetensors").stat().st_size > 500_000_000  # 135M float32 weights
    assert not hasattr(lm.config, "quantization_config")  # a plain float model, no GGUF on the next load
    assert lm.config.hidden_size == 576 and lm.config.num_hidden_layers == 30
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
