"""Tiny random-initialised Hugging Face Llava checkpoints written to disk (vision CLIP + Llama), with tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["what", "is", "this", "item", "?", "a", "bag", "red", "circle", "yes", "no", "how", "many", "shapes",
         "USER:", "ASSISTANT:", "<image>", "answer", "with", "few", "words", "."]


def tiny_tokenizer(max_len: int = 64):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_len)


def write_tiny_llava(path: Path, text_hidden: int = 32, projector_out: int | None = None,
                     max_positions: int = 64, seed: int = 0) -> Path:
    """A LlavaForConditionalGeneration with 2-layer CLIP vision (32 px, 8 px patches -> 16 tokens) and Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    tok = tiny_tokenizer(max_positions)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=16)
    model = LlavaForConditionalGeneration(config)
    if projector_out is not None:  # a checkpoint whose parts do not fit: projector width != LM hidden size
        proj = model.model.multi_modal_projector
        proj.linear_1 = torch.nn.Linear(24, projector_out)
        proj.linear_2 = torch.nn.Linear(projector_out, projector_out)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def write_tiny_lm(path: Path, seed: int = 0) -> Path:
    """A tiny Llama causal LM with tied input/output embeddings and a chat template (a SmolLM2 stand-in)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer(64)
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
