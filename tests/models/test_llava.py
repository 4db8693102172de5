"""The llava family on tiny random checkpoints: loading, generation (= transformers' own Llava), KV cache,
clear errors, answer-only loss masking and visual-token pruning."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from lowbit.errors import LowbitError
from tests.models.llava_tiny import tiny_tokenizer, write_tiny_llava

QUESTION = "what is this item ?"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    from lowbit.models import load_model

    return load_model(str(tiny_dir))


def _image(colour: tuple[int, int, int] = (200, 20, 20)) -> Image.Image:
    img = Image.new("RGB", (40, 40), (240, 240, 240))
    img.paste(colour, (5, 5, 25, 30))
    return img


def test_tiny_hf_llava_loads_with_three_towers(tiny) -> None:
    from lowbit.models.llava import LlavaModel

    assert isinstance(tiny, LlavaModel)
    assert set(tiny.towers()) == {"vision", "projector", "language"}
    assert tiny.context_window == 64
    visual = tiny.visual_embeddings(tiny.preprocess([_image()]))
    assert tuple(visual.shape) == (1, 16, 32)  # (32 px / 8 px)^2 patches, CLS dropped; LM width 32


def test_generation_equals_transformers_llava(tiny, tiny_dir: Path) -> None:
    """Our re-assembled towers + spliced prompt give exactly the tokens of LlavaForConditionalGeneration."""
    from transformers import LlavaForConditionalGeneration

    from lowbit.models.llava_generate import Decoding, generate_batch

    pixels = tiny.preprocess([_image()])
    ours = generate_batch(tiny, pixels, [QUESTION], Decoding(max_new_tokens=8)).token_ids[0]
    hf = LlavaForConditionalGeneration.from_pretrained(str(tiny_dir)).eval()
    pre, post = tiny.prompt_ids(QUESTION)
    ids = torch.tensor([pre + [hf.config.image_token_index] * 16 + post])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                          eos_token_id=3, pad_token_id=0)
    theirs = out[0, ids.shape[1]:].tolist()
    theirs = theirs[: theirs.index(3)] if 3 in theirs else theirs
    assert len(ours) >= 1 and ours == theirs


def test_kv_cache_generation_equals_no_cache(tiny) -> None:
    from lowbit.models.llava_generate import Decoding, generate_batch

    pixels = tiny.preprocess([_image(), _image((20, 20, 200))])
    questions = [QUESTION, "how many shapes ?"]
    cached = generate_batch(tiny, pixels, questions, Decoding(12, use_cache=True), first_logprobs=True)
    uncached = generate_batch(tiny, pixels, questions, Decoding(12, use_cache=False), first_logprobs=True)
    assert cached.token_ids == uncached.token_ids and all(len(t) >= 1 for t in cached.token_ids)
    assert torch.allclose(cached.first_logprobs, uncached.first_logprobs, atol=1e-5)


def test_streaming_and_sampling(tiny) -> None:
    pieces: list[str] = []
    answer = tiny.chat(_image(), QUESTION, max_new_tokens=6, stream=pieces.append)
    assert "".join(pieces).strip() == answer and len(pieces) >= 1
    a = tiny.chat(_image(), QUESTION, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    b = tiny.chat(_image(), QUESTION, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    assert a == b  # seeded sampling is reproducible


def test_batched_left_padding_matches_single(tiny) -> None:
    from lowbit.models.llava_generate import Decoding, generate_batch

    images, questions = [_image(), _image((20, 200, 20))], [QUESTION, "is this a red circle with few words ?"]
    batch = generate_batch(tiny, tiny.preprocess(images), questions, Decoding(8)).token_ids
    single = [generate_batch(tiny, tiny.preprocess([i]), [q], Decoding(8)).token_ids[0]
              for i, q in zip(images, questions, strict=True)]
    assert batch == single


def test_undecodable_image_is_one_clear_error(tiny, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    for image in (bad, b"garbage bytes", tmp_path / "missing.png"):
        with pytest.raises(LowbitError, match="cannot decode image|does not exist") as info:
            tiny.chat(image, QUESTION)
        assert "\n" not in str(info.value)
    truncated = io.BytesIO()
    _image().save(truncated, format="PNG")
    with pytest.raises(LowbitError, match="cannot decode image"):
        tiny.chat(truncated.getvalue()[:60], QUESTION)


def test_prompt_longer_than_context_window_is_one_clear_error(tiny) -> None:
    long_question = " ".join(["what"] * 80)  # 80 text tokens + 16 visual > 64 positions
    with pytest.raises(LowbitError, match=r"context window is 64 tokens") as info:
        tiny.chat(_image(), long_question)
    assert "16 visual" in str(info.value)


def test_projector_that_does_not_fit_the_lm_is_one_clear_error(tmp_path: Path) -> None:
    from lowbit.models import load_model

    bad = write_tiny_llava(tmp_path / "bad", projector_out=48)  # LM hidden size is 32
    with pytest.raises(LowbitError, match=r"does not fit together: the projector outputs 48-d tokens but the "
                                          r"language model's hidden size is 32"):
        load_model(str(bad))


def test_from_parts_projector_width_check() -> None:
    from lowbit.models.llava import LlavaModel, Projector
    from lowbit.models.llava_vision import EfficientNetGrid

    class _LM(torch.nn.Module):
        config = type("C", (), {"hidden_size": 32, "max_position_embeddings": 64})()

    vision = EfficientNetGrid(torch.nn.Identity(), out_dim=1280)
    with pytest.raises(LowbitError, match="hidden size is 32"):
        LlavaModel(vision, Projector(1280, 64), _LM(), tiny_tokenizer(), lambda images: torch.zeros(1))
    with pytest.raises(LowbitError, match="vision tower gives 1280-d"):
        LlavaModel(vision, Projector(640, 32), _LM(), tiny_tokenizer(), lambda images: torch.zeros(1))


def test_cli_chat_bad_image_exits_2_with_one_line(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    from lowbit.cli import main

    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"nope")
    assert main(["chat", str(tiny_dir), "--image", str(bad), QUESTION]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: cannot decode image") and "\n" not in err


def test_cli_chat_streams_answer(tiny, tiny_dir: Path, tmp_path: Path, capsys) -> None:
    from lowbit.cli import main

    path = tmp_path / "img.png"
    _image().save(path)
    assert main(["chat", str(tiny_dir), "--image", str(path), QUESTION, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == tiny.chat(path, QUESTION, max_new_tokens=5)


def test_answer_only_loss_masking(tiny) -> None:
    from lowbit.models.llava_chat import IGNORE_INDEX, encode_conversation
    from lowbit.workflows.build_llava import AnswerLoss

    tok = tiny.tokenizer
    turns = [("what is this item ?", "a bag"), ("is this a red circle ?", "no")]
    enc = encode_conversation(tok, turns, system=None)
    answer_ids = [t for t, lab in zip(enc.post, enc.labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(answer_ids).split() == ["a", "bag", "</s>", "no", "</s>"]
    assert enc.post[: len(tiny.prompt_ids(turns[0][0])[1])] == tiny.prompt_ids(turns[0][0])[1]

    # The training loss equals a hand computation of cross-entropy over exactly those answer positions.
    pixels = tiny.preprocess([_image()])
    tokens, _ = tiny.vision(pixels)
    loss = AnswerLoss(tiny)({"tokens": tokens, "pre": [enc.pre], "post": [enc.post], "labels": [enc.labels]})["loss"]
    embeds = torch.cat([tiny.embed_ids(enc.pre), tiny.projector(tokens)[0], tiny.embed_ids(enc.post)])[None]
    logits = tiny.language(inputs_embeds=embeds).logits[0]  # [T, V]
    offset = len(enc.pre) + tokens.shape[1]
    positions = [offset + i - 1 for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    expected = torch.nn.functional.cross_entropy(logits[positions], torch.tensor(answer_ids))
    assert abs(float(loss) - float(expected)) < 1e-5


def test_pruning_aware_answer_loss_reads_the_tokens_inference_keeps(tiny) -> None:
    from lowbit.models.llava_chat import encode_conversation
    from lowbit.workflows.build_llava import AnswerLoss

    enc = encode_conversation(tiny.tokenizer, [("what is this item ?", "a bag")], system=None)
    pixels = tiny.preprocess([_image(), _image((20, 20, 200))])
    tokens, scores = tiny.vision(pixels)
    batch = {"tokens": tokens, "scores": scores, "pre": [enc.pre] * 2, "post": [enc.post] * 2,
             "labels": [enc.labels] * 2}
    loss = AnswerLoss(tiny)
    full = loss(batch)["loss"]
    assert torch.equal(loss({**batch, "prune_ratios": [0.0, 0.0]})["loss"], full)
    # Pruning the second sample in training = running it on exactly the visual tokens inference keeps.
    pruned = loss({**batch, "prune_ratios": [0.0, 0.5]})["loss"]
    kept = tiny.visual_embeddings(pixels[1:], prune_ratio=0.5)[0]  # [8, D]
    assert kept.shape[0] == tokens.shape[1] // 2
    rows = [torch.cat([tiny.embed_ids(enc.pre), v, tiny.embed_ids(enc.post)])
            for v in (tiny.projector(tokens[0]), kept)]
    ce = []
    for r in rows:
        logits = tiny.language(inputs_embeds=r[None]).logits[0]  # [T, V]
        offset = r.shape[0] - len(enc.post)
        pos = [offset + i - 1 for i, lab in enumerate(enc.labels) if lab >= 0]
        ce.append(torch.nn.functional.cross_entropy(logits[pos], torch.tensor([enc.labels[i + 1 - offset]
                                                                                for i in pos]), reduction="sum"))
    n_answer = 2 * sum(lab >= 0 for lab in enc.labels)
    assert abs(float(pruned) - float(sum(ce)) / n_answer) < 1e-5
    assert abs(float(pruned) - float(full)) > 1e-6  # the pruned sample really changed


def test_pruning_ratio_zero_equals_no_pruning(tiny) -> None:
    from lowbit.models.token_pruning import prune_tokens

    tokens, scores = torch.randn(2, 16, 8), torch.rand(2, 16)
    assert prune_tokens(tokens, scores, 0.0) is tokens
    pixels = tiny.preprocess([_image()])
    full = tiny.visual_embeddings(pixels)
    assert torch.equal(tiny.visual_embeddings(pixels, prune_ratio=0.0), full)
    kept = tiny.visual_embeddings(pixels, prune_ratio=0.5)
    assert kept.shape[1] == 8
    # The survivors are the 8 best-scored tokens, in their original order.
    raw, score = tiny.vision(pixels)
    order = score[0].topk(8).indices.sort().values
    assert torch.allclose(kept[0], tiny.projector(raw[0, order]), atol=1e-6)


def test_with_config_shares_weights_and_leaves_the_original_alone(tiny) -> None:
    view = tiny.with_config(prune_ratio=0.5)
    assert view.config.prune_ratio == 0.5 and tiny.config.prune_ratio == 0.0
    assert view.language is tiny.language and view.projector is tiny.projector
    pixels = tiny.preprocess([_image()])
    assert view.visual_embeddings(pixels).shape[1] == tiny.visual_embeddings(pixels).shape[1] // 2
    with pytest.raises(LowbitError, match="prune_ratio must be in"):
        tiny.with_config(prune_ratio=1.0)


def test_pruned_generation_runs_and_ratio_is_validated(tiny_dir: Path) -> None:
    from lowbit.models import load_model

    pruned = load_model(str(tiny_dir), prune_ratio=0.75)
    assert pruned.visual_embeddings(pruned.preprocess([_image()])).shape[1] == 4
    assert isinstance(pruned.chat(_image(), QUESTION, max_new_tokens=4), str)
    with pytest.raises(LowbitError, match=r"prune_ratio must be in \[0, 1\)"):
        load_model(str(tiny_dir), prune_ratio=1.0)
