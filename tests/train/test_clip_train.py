"""``lowbit train clip`` end to end on tiny data: presets, tokenizer, batches, export, resume, CLI wiring."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from lowbit.data.base import ImageTextSet
from lowbit.data.fashion_mnist import CLASSNAMES, TEMPLATES
from lowbit.errors import LowbitError
from lowbit.train.clip_data import (
    caption_table,
    memory_batches,
    processor_pixels,
    shard_batches,
    to_float_pixels,
)
from lowbit.train.clip_train import ClipTrainArgs, train_clip
from lowbit.train.presets import build_dual_encoder, image_processor, resolve_preset
from lowbit.train.tokenizer import EOS_ID, build_word_tokenizer


@pytest.fixture(scope="module")
def processor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return image_processor("tiny")


def _fashion_like(n: int = 12) -> ImageTextSet:
    rng = np.random.default_rng(0)
    from PIL import Image

    labels = [i % 10 for i in range(n)]
    images = [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(n)]
    return ImageTextSet("fashion-mnist", images, labels, list(CLASSNAMES),
                        [TEMPLATES[0].format(CLASSNAMES[y]) for y in labels], list(TEMPLATES))


def test_caption_table_templates_for_label_captions_and_own_captions_otherwise():
    from lowbit.data.shapes import generate_shapes

    fashion, shapes = _fashion_like(), generate_shapes(5, seed=0, size=16)
    table = caption_table([fashion, shapes])
    assert len(table.texts) == 10 * len(TEMPLATES) + 5
    y = fashion.labels[3]
    choices = table.texts[table.first[3] : table.first[3] + table.count[3]]
    assert choices == [t.format(CLASSNAMES[y]) for t in TEMPLATES]
    assert [table.texts[i] for i in table.first[12:]] == shapes.captions and set(table.count[12:]) == {1}
    assert caption_table([fashion], "captions").texts == sorted(set(fashion.captions), key=fashion.captions.index)
    with pytest.raises(LowbitError, match="caption mode"):
        caption_table([fashion], "random")


def test_stored_pixels_equal_the_image_processor_output(processor):
    images = _fashion_like(5).images
    direct = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    stored = processor_pixels(processor, images)
    assert stored.dtype == torch.uint8 and stored.shape == (5, 3, 32, 32)
    torch.testing.assert_close(to_float_pixels(stored, processor), direct, atol=1e-5, rtol=0)


def test_tokenizer_is_deterministic_and_clip_pools_at_the_end_token():
    texts = ["a photo of a coat.", "a photo of a bag.", "a coat"]
    tok = build_word_tokenizer(texts, max_length=12)
    assert tok.get_vocab() == build_word_tokenizer(list(reversed(texts)), max_length=12).get_vocab()
    enc = tok(["a photo of a bag.", "zebra"], padding=True, return_tensors="pt")
    assert enc["input_ids"][1].tolist()[:3] == [2, 1, EOS_ID]  # unknown word -> <unk>
    torch.manual_seed(0)
    model = build_dual_encoder(resolve_preset("tiny", text_layers=1, vision_layers=1), len(tok))
    out = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    eos_at = (enc["input_ids"] == EOS_ID).int().argmax(dim=1)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_at])


def test_memory_batches_split_by_rank_is_the_global_batch(processor):
    tok = build_word_tokenizer(caption_table([_fashion_like()]).texts, 32)
    factory, n = memory_batches([_fashion_like()], processor, tok, global_batch=4, seed=0, max_length=32,
                                pad_to_max=True)
    assert n == 12
    for step in (0, 5):
        whole = next(factory(step, 0, 1))
        parts = [next(factory(step, r, 2)) for r in range(2)]
        for key in ("pixel_values", "input_ids"):
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])


def test_same_template_gives_one_caption_per_class_per_step(processor):
    data = _fashion_like(20)
    tok = build_word_tokenizer(caption_table([data]).texts, 32)
    factory, _ = memory_batches([data], processor, tok, global_batch=20, seed=0, max_length=32, pad_to_max=False,
                                same_template=True)
    seen_templates = set()
    for step in range(4):
        batch = next(factory(step, 0, 1))
        # 10 classes x 2 images: every class has exactly one caption id in the step
        assert len(set(batch["caption_ids"].tolist())) == 10
        seen_templates.add(tuple(batch["caption_ids"].tolist()))
        parts = [next(factory(step, r, 2))["caption_ids"] for r in range(2)]
        assert torch.equal(torch.cat(parts), batch["caption_ids"])
    assert len(seen_templates) > 1  # the template changes from step to step


def test_shard_batches_resume_at_a_step_replays_the_same_batches(tmp_path, processor):
    from lowbit.data.shapes import generate_shapes
    from lowbit.data.shards import write_shards

    data = generate_shapes(24, seed=0, size=16)
    write_shards(data, tmp_path / "s", shard_size=5, progress=False)
    tok = build_word_tokenizer(data.captions, 32)
    for workers in (0, 2):
        factory = shard_batches(tmp_path / "s", processor, tok, global_batch=4, seed=0, max_length=32,
                                pad_to_max=False, num_workers=workers, shuffle_buffer=4)
        it = factory(0, 0, 1)
        straight = [next(it)["input_ids"] for _ in range(9)]  # crosses an epoch (6 batches of 4)
        it = factory(5, 0, 1)
        resumed = [next(it)["input_ids"] for _ in range(4)]
        for a, b in zip(straight[5:], resumed, strict=True):
            assert torch.equal(a, b)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train_clip(ClipTrainArgs(
        data="fashion-mnist,shapes", out=str(out), steps=4, batch_size=8, warmup_steps=1, limit=24, log_every=2,
        ckpt_every=2, eval_task="fashion-mnist", eval_limit=20, progress=False, patch_dropout=0.5,
        preset_overrides=dict(vision_layers=1, text_layers=1)))
    return out, summary


def test_train_clip_writes_a_loadable_standard_checkpoint(trained):
    from transformers import AutoModel, AutoTokenizer

    from lowbit.models import load_model

    out, summary = trained
    assert summary["steps"] == 4 and summary["samples"] == 48 and summary["final_eval"]["n"] == 20
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [2, 4]
    assert AutoModel.from_pretrained(out / "model").config.model_type == "clip"
    assert AutoTokenizer.from_pretrained(out / "model")("a photo of a coat.")["input_ids"][-1] == EOS_ID
    model = load_model(str(out / "model"))
    emb = model.embed_texts(["a photo of a coat.", "a large red circle on the left"])
    assert emb.shape == (2, 128) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_rerunning_a_finished_run_continues_from_its_checkpoint(trained):
    out, first = trained
    again = train_clip(ClipTrainArgs(**{**first["args"], "progress": False}))
    assert again["resumed_from"] == 4 and again["steps"] == 4


def test_export_half_stores_fp16_but_loads_as_float32(tmp_path, trained, processor):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from lowbit.train.clip_train import export_model

    out, _ = trained
    model = AutoModel.from_pretrained(out / "model")
    export_model(model, AutoTokenizer.from_pretrained(out / "model"), processor, tmp_path / "h", half=True)
    assert {t.dtype for t in load_file(str(tmp_path / "h" / "model.safetensors")).values()} == {torch.float16}
    back = AutoModel.from_pretrained(tmp_path / "h")
    assert back.dtype == torch.float32
    torch.testing.assert_close(back.text_projection.weight, model.text_projection.weight.half().float())


def test_siglip_loss_trains_a_siglip_model(tmp_path):
    summary = train_clip(ClipTrainArgs(
        data="shapes", out=str(tmp_path), loss="siglip", steps=2, batch_size=4, warmup_steps=1, limit=8,
        log_every=1, ckpt_every=2, eval_task="", progress=False,
        preset_overrides=dict(vision_layers=1, text_layers=1)))
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "siglip"
    assert summary["last"]["loss"] > 0


def test_bad_arguments_are_one_line_errors(tmp_path):
    from lowbit.cli.train import main

    assert main(["train", "clip", "--data", "shapes", "--out", str(tmp_path), "--model", "huge"]) == 2
    with pytest.raises(LowbitError, match="batch_size: received 0"):
        train_clip(ClipTrainArgs(data="shapes", out=str(tmp_path / "b"), batch_size=0, limit=4, progress=False))


def test_lowbit_parser_has_train_clip_and_data_shard():
    from lowbit.cli import build_parser
    from lowbit.cli.train import cmd_data_shard, cmd_train_clip

    parser = build_parser()  # lowbit.cli calls register_cli(sub)
    args = parser.parse_args(["train", "clip", "--data", "fashion-mnist", "--out", "x", "--loss", "siglip", "--bf16",
                              "--arch", "patch_size=4"])
    assert args.func is cmd_train_clip and args.loss == "siglip" and args.bf16 and args.batch_size == 256
    assert args.arch == ["patch_size=4"]
    assert parser.parse_args(["data", "shard", "shapes", "--out", "y"]).func is cmd_data_shard


def test_train_clip_streams_a_shard_directory(tmp_path):
    from lowbit.data.shapes import generate_shapes
    from lowbit.data.shards import write_shards

    write_shards(generate_shapes(12, seed=0, size=16), tmp_path / "shards", shard_size=5, progress=False)
    summary = train_clip(ClipTrainArgs(
        data=str(tmp_path / "shards"), out=str(tmp_path / "run"), steps=2, batch_size=4, warmup_steps=1,
        log_every=1, ckpt_every=2, eval_task="", num_workers=0, progress=False,
        preset_overrides=dict(vision_layers=1, text_layers=1)))
    assert summary["steps"] == 2 and summary["data_stats"] == {"skipped": 0, "truncated_shards": 0}
    assert (tmp_path / "run" / "model" / "config.json").is_file()
