"""llava_generate: one question runs on the lean engine with the tokens, first log-probs and stream of
transformers' ``generate``; batches and quantized KV caches keep ``generate``."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
from PIL import Image

from tests.models.llava_tiny import write_tiny_llava

QUESTION = "what is this item ?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from lowbit.models import load_model

    return load_model(str(write_tiny_llava(tmp_path_factory.mktemp("tiny-llava-gen"))))


def _pixels(tiny, colour: tuple[int, int, int] = (200, 20, 20)) -> torch.Tensor:
    img = Image.new("RGB", (40, 40), (240, 240, 240))
    img.paste(colour, (5, 5, 25, 30))
    return tiny.preprocess([img])


def _generate(tiny, pixels, decoding, **kw):
    """generate_batch, counting the lean engine's generate calls."""
    from lowbit.models import lean_decode
    from lowbit.models.llava_generate import generate_batch

    real = lean_decode.LeanDecoder.generate
    with mock.patch.object(lean_decode.LeanDecoder, "generate", autospec=True, side_effect=real) as spy:
        out = generate_batch(tiny, pixels, [QUESTION] * pixels.shape[0], decoding, **kw)
    return out, spy.call_count


def test_single_question_runs_lean_and_equals_generate(tiny) -> None:
    from lowbit.models.llava_generate import Decoding

    pixels = _pixels(tiny)
    lean, calls = _generate(tiny, pixels, Decoding(12), first_logprobs=True)
    hf, hf_calls = _generate(tiny, pixels, Decoding(12, lean=False), first_logprobs=True)
    assert (calls, hf_calls) == (1, 0)
    assert lean.token_ids == hf.token_ids and len(lean.token_ids[0]) >= 1
    assert torch.allclose(lean.first_logprobs, hf.first_logprobs, atol=1e-5)


def test_stop_token_ids_cached_until_the_vocabulary_changes(tiny) -> None:
    from lowbit.models.llava_generate import stop_token_ids

    tok = copy.deepcopy(tiny.tokenizer)  # its vocabulary is changed below
    first = stop_token_ids(tok, tiny.language)
    with mock.patch.object(type(tok), "get_vocab", side_effect=AssertionError("not cached")):
        assert stop_token_ids(tok, tiny.language) == first  # the second answer does not rebuild the vocabulary
    tok.add_tokens(["<|im_end|>"], special_tokens=True)  # the vocabulary changes: computed again
    assert stop_token_ids(tok, tiny.language) == sorted({*first, tok.convert_tokens_to_ids("<|im_end|>")})


def test_lean_streaming_sends_the_answer(tiny) -> None:
    from lowbit.models.llava_generate import Decoding

    pieces: list[str] = []
    out, calls = _generate(tiny, _pixels(tiny), Decoding(10), stream=pieces.append)
    assert calls == 1 and "".join(pieces).strip() == out.texts[0] and len(pieces) >= 1


def test_batches_and_quantized_kv_cache_use_generate(tiny) -> None:
    from lowbit.models.llava_generate import Decoding

    pixels = torch.cat([_pixels(tiny), _pixels(tiny, (20, 20, 200))])
    _, batch_calls = _generate(tiny, pixels, Decoding(6))
    kv8, kv_calls = _generate(tiny, _pixels(tiny), Decoding(6, kv_bits=8))
    assert (batch_calls, kv_calls) == (0, 0)
    assert len(kv8.token_ids[0]) >= 1
