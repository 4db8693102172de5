"""Visual-token pruning inside the LM (FastV, ``LlavaConfig.prune_layer``) on a tiny random Llava: the span
it prunes is the visual tokens, ratio 0 changes nothing, batches equal single questions, and what cannot run
it says so in one line. The engine's FastV itself is tested against transformers in test_lean_decode.py."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lowbit.errors import LowbitError
from tests.models.llava_tiny import write_tiny_llava

QUESTION = "what is this item ?"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_llava(tmp_path_factory.mktemp("tiny-llava-prune"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from lowbit.models import load_model

    return load_model(str(tiny_dir))


def _pixels(tiny, colours=((200, 20, 20),)) -> torch.Tensor:
    images = []
    for colour in colours:
        img = Image.new("RGB", (40, 40), (240, 240, 240))
        img.paste(colour, (5, 5, 25, 30))
        images.append(img)
    return tiny.preprocess(images)


def test_kept_count_and_fastv_span_is_the_visual_tokens(tiny) -> None:
    fastv = tiny.with_config(prune_layer=1, prune_ratio=0.5)
    pixels = _pixels(tiny)
    visual = fastv.visual_embeddings(pixels)
    assert visual.shape[1] == 16  # nothing dropped before the LM: the LM prunes
    step = fastv.in_layer_prune(QUESTION, visual.shape[1])
    assert (step.layer, step.count, step.keep) == (1, 16, 8)
    embeds, _ = fastv.prompt_embeddings(visual, [QUESTION])
    assert torch.equal(embeds[0, step.start:step.start + step.count], visual[0])
    assert tiny.in_layer_prune(QUESTION, 16) is None  # prune_layer 0: before the LM
    assert tiny.with_config(prune_layer=1).in_layer_prune(QUESTION, 16) is None  # ratio 0: nothing to drop


def test_fastv_ratio_zero_equals_no_pruning_and_pruning_changes_the_answer_logits(tiny) -> None:
    from lowbit.models.llava_generate import Decoding, generate_batch

    pixels = _pixels(tiny)
    full = generate_batch(tiny, pixels, [QUESTION], Decoding(6), first_logprobs=True)
    zero = generate_batch(tiny.with_config(prune_layer=1), pixels, [QUESTION], Decoding(6), first_logprobs=True)
    assert zero.token_ids == full.token_ids and torch.equal(zero.first_logprobs, full.first_logprobs)
    fastv = generate_batch(tiny.with_config(prune_layer=1, prune_ratio=0.75), pixels, [QUESTION], Decoding(6),
                           first_logprobs=True)
    assert float((fastv.first_logprobs - full.first_logprobs).abs().max()) > 1e-4


def test_fastv_batch_equals_one_question_at_a_time(tiny) -> None:
    from lowbit.models.llava_generate import Decoding, generate_batch

    fastv = tiny.with_config(prune_layer=1, prune_ratio=0.5)
    pixels = _pixels(tiny, ((200, 20, 20), (20, 20, 200)))
    questions = [QUESTION, "how many shapes ?"]
    batch = generate_batch(fastv, pixels, questions, Decoding(5), first_logprobs=True)
    for i, q in enumerate(questions):
        one = generate_batch(fastv, pixels[i:i + 1], [q], Decoding(5), first_logprobs=True)
        assert one.token_ids[0] == batch.token_ids[i]
        assert torch.allclose(one.first_logprobs[0], batch.first_logprobs[i], atol=1e-6)


def test_first_token_and_forced_tokens_follow_fastv(tiny) -> None:
    from lowbit.eval.vqa import first_token_fn
    from lowbit.models.llava_generate import Decoding, forced_tokens, generate_batch

    fastv = tiny.with_config(prune_layer=1, prune_ratio=0.75)
    pixels = _pixels(tiny)
    ref = generate_batch(fastv, pixels, [QUESTION], Decoding(4), first_logprobs=True)
    first = first_token_fn(fastv, Image.new("RGB", (40, 40)), QUESTION)()
    assert first.shape == (1, 1)
    assert forced_tokens(fastv, pixels, QUESTION, 1)[0, 0] == ref.first_logprobs[0].argmax()
    assert forced_tokens(fastv, pixels, QUESTION, 7).shape == (1, 7)  # stop tokens ignored: exactly n
    # transformers' path (a 4-bit KV cache) also gives exactly n, greedy as generate_batch
    kv4 = tiny.with_config(kv_bits=4)
    forced = forced_tokens(kv4, pixels, QUESTION, 7)
    assert forced.shape == (1, 7)
    answer = generate_batch(kv4, pixels, [QUESTION], Decoding(7)).token_ids[0]
    assert forced[0, :len(answer)].tolist() == answer


def test_fastv_settings_that_cannot_run_give_one_line(tiny) -> None:
    from lowbit.models.llava_generate import Decoding, generate_batch

    with pytest.raises(LowbitError, match="prune_layer must be an integer >= 0; received -1"):
        tiny.with_config(prune_layer=-1)
    pixels = _pixels(tiny)
    with pytest.raises(LowbitError, match=r"prune_layer must be in \[1, 1\] for this 2-layer language model"):
        generate_batch(tiny.with_config(prune_layer=2, prune_ratio=0.5), pixels, [QUESTION], Decoding(3))
    with pytest.raises(LowbitError, match="runs on the lean decoding engine, which cannot run here: a 4-bit KV"):
        generate_batch(tiny.with_config(prune_layer=1, prune_ratio=0.5), pixels, [QUESTION], Decoding(3, kv_bits=4))


def test_cli_chat_prunes_inside_the_lm_or_exits_2(tiny, tiny_dir, tmp_path, capsys) -> None:
    from lowbit.cli import main

    path = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (200, 20, 20)).save(path)
    args = ["chat", str(tiny_dir), "--image", str(path), QUESTION, "--max-new-tokens", "4", "--prune-ratio", "0.5"]
    assert main([*args, "--prune-layer", "1"]) == 0
    fastv = tiny.with_config(prune_layer=1, prune_ratio=0.5)
    assert capsys.readouterr().out.strip() == fastv.chat(path, QUESTION, max_new_tokens=4)
    assert main([*args, "--prune-layer", "7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' weight-loading bar)
    assert err.startswith("lowbit: error: prune_layer must be in [1, 1] for this 2-layer language model")
