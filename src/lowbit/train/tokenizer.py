"""A word-level tokenizer built from the training captions with the ``tokenizers`` library.

Small from-scratch models see a closed vocabulary (class names, templates, generated captions), so a word
level vocabulary is both the smallest and the most faithful choice; words never seen in training map to
``<unk>``. Text is lower-cased and split on whitespace and punctuation ("t-shirt" -> "t", "-", "shirt").

The result is a transformers ``PreTrainedTokenizerFast`` that ``save_pretrained`` writes beside the model,
so ``AutoTokenizer.from_pretrained(dir)`` (and ``lowbit.load(dir)``) get it back. Token ids: ``<pad>`` 0,
``<unk>`` 1, ``<sot>`` 2, ``<eot>`` 3; each text becomes ``<sot> words <eot>``. The end token is 3, not 2,
because transformers' CLIP treats ``eos_token_id == 2`` as a legacy config and pools at the highest id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<sot>", "<eot>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def build_word_tokenizer(texts: Iterable[str], max_length: int, min_frequency: int = 1) -> Any:
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every word seen ``min_frequency`` times in ``texts``.

    Words are ordered by frequency then alphabetically, so the same texts always give the same ids.

    Example:
        >>> tok = build_word_tokenizer(["a red circle", "a blue square"], max_length=8)
        >>> tok("a red square")["input_ids"]
        [2, 4, 7, 8, 3]
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    splitter = pre_tokenizers.Whitespace()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(text.lower()))
    words = sorted((w for w, c in counts.items() if c >= min_frequency), key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)} | {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(
        single="<sot> $A <eot>", special_tokens=[("<sot>", BOS_ID), ("<eot>", EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<sot>", eos_token="<eot>",
        model_max_length=max_length,
    )
