"""Tiny random causal LMs of every family the ``causal-lm`` family claims, built from transformers configs, with
a byte-level tokenizer carrying a ChatML template (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 260  # 256 byte tokens + <s>, </s>, <|im_start|>, <|im_end|>
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 256,
          "eos_token_id": 257, "pad_token_id": 257}
# model_type -> (config class, model class, extra config fields)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 128}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": True}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 32,
                                                      "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 32,
                                                              "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """``overrides``: config fields replacing the common ones (e.g. odd widths)."""
    import transformers

    config_name, model_name, extra = FAMILIES[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**(COMMON | extra | overrides))
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random init is near zero everywhere: widen it so greedy tokens are not all ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def save_tiny_causal_lm(model_type: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """A transformers directory (config, safetensors, tokenizer with chat template) of a tiny random model."""
    tiny_causal_lm(model_type, seed, **overrides).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out
