"""Tar shards: written then streamed back exactly once per epoch across ranks x workers; damage is skipped."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowbit.data.base import ImageTextSet
from lowbit.data.images import ImageSkippedWarning
from lowbit.data.shapes import generate_shapes
from lowbit.data.shards import ShardStream, ShardWarning, iter_raw, load_shards, write_shards
from lowbit.errors import LowbitError

N = 30


@pytest.fixture(scope="module")
def shapes() -> ImageTextSet:
    return generate_shapes(N, seed=5, size=16)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, shapes) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shapes"
    write_shards(shapes, out, shard_size=4, progress=False)  # 8 shards, the last one with 2 samples
    return out


def _keys(stream: ShardStream, epoch: int, world: int, workers: int) -> list[str]:
    return [s.key for r in range(world) for w in range(workers) for s in stream.epoch(epoch, r, world, w, workers)]


def test_layout_is_img2dataset_style(shard_dir):
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == [f"{i:05d}.tar" for i in range(8)] + ["manifest.json"]
    with tarfile.open(shard_dir / "00000.tar") as tar:
        assert tar.getnames()[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]


@pytest.mark.parametrize("shard_size", [4, 20])  # 8 shards >= 4 slots, and 2 shards < 4 slots
def test_every_sample_exactly_once_per_epoch_across_2_ranks_x_2_workers(tmp_path, shapes, shard_size):
    write_shards(shapes, tmp_path / "s", shard_size=shard_size, progress=False)
    stream = ShardStream(tmp_path / "s", seed=1, shuffle_buffer=5)
    expected = [f"{i:09d}" for i in range(N)]
    epoch0, epoch1 = _keys(stream, 0, 2, 2), _keys(stream, 1, 2, 2)
    assert sorted(epoch0) == expected and sorted(epoch1) == expected
    assert epoch0 != epoch1  # reshuffled each epoch
    assert epoch0 == _keys(ShardStream(tmp_path / "s", seed=1, shuffle_buffer=5), 0, 2, 2)  # deterministic
    assert stream.stats.skipped == 0 and stream.stats.truncated_shards == 0


def test_round_trip_keeps_captions_labels_and_png_pixels(tmp_path, shapes):
    write_shards(shapes, tmp_path / "png", shard_size=7, image_format="png", progress=False)
    back = load_shards(tmp_path / "png")
    assert back.captions == shapes.captions and back.labels == shapes.labels
    assert back.classnames == shapes.classnames and back.templates == shapes.templates
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back.images, shapes.images, strict=True))
    assert len(load_shards(tmp_path / "png", limit=10)) == 10


def _rewrite(src: Path, dst: Path, corrupt_key: str | None = None, drop_txt_key: str | None = None) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if corrupt_key and m.name == f"{corrupt_key}.jpg":
                data = data[:20] + b"\x00" * 40  # a JPEG header followed by garbage
            if drop_txt_key and m.name.startswith(drop_txt_key) and m.name.endswith((".txt", ".json")):
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_corrupt_sample_and_missing_caption_are_skipped_and_counted(tmp_path, shard_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sorted(shard_dir.glob("*.tar")):
        _rewrite(p, bad / p.name, corrupt_key="000000001", drop_txt_key="000000006")
    stream = ShardStream(bad, seed=0)
    with pytest.warns(ImageSkippedWarning):
        keys = _keys(stream, 0, 1, 1)
    assert sorted(keys) == [f"{i:09d}" for i in range(N) if i not in (1, 6)]
    assert stream.stats.skipped == 2
    reasons = stream.stats.reasons
    assert reasons["no caption"] == 1 and sum(n for r, n in reasons.items() if r.startswith("bad image")) == 1


def test_truncated_shard_keeps_earlier_samples_and_the_run_goes_on(tmp_path, shard_dir):
    cut = tmp_path / "cut"
    cut.mkdir()
    for p in sorted(shard_dir.glob("*.tar")):
        data = p.read_bytes()
        if p.name == "00002.tar":  # samples 8..11: keep the first sample's members, cut into the second's image
            with tarfile.open(p) as tar:
                members = tar.getmembers()
            data = data[: members[4].offset_data + 10]
        (cut / p.name).write_bytes(data)
    stream = ShardStream(cut, seed=0)
    with pytest.warns(ShardWarning, match="00002.tar"):
        keys = _keys(stream, 0, 1, 1)
    assert stream.stats.truncated_shards == 1
    assert sorted(keys) == [f"{i:09d}" for i in range(N) if i not in (9, 10, 11)]
    # an endless stream over the damaged shards keeps producing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = stream.stream()
        assert len([next(it) for _ in range(3 * N)]) == 3 * N


def test_stream_resume_skips_what_was_consumed(shard_dir):
    full = ShardStream(shard_dir, seed=2, shuffle_buffer=3).stream(rank=1, world=2)
    first = [next(full).key for _ in range(40)]  # crosses the epoch boundary
    resumed = ShardStream(shard_dir, seed=2, shuffle_buffer=3).stream(rank=1, world=2, skip=25)
    assert [next(resumed).key for _ in range(15)] == first[25:]


def test_iter_raw_groups_members_by_key(shard_dir):
    from lowbit.data.shards import ShardStats

    groups = list(iter_raw(shard_dir / "00001.tar", ShardStats()))
    assert [k for k, _ in groups] == [f"{i:09d}" for i in range(4, 8)]
    assert sorted(groups[0][1]) == ["jpg", "json", "txt"]


def test_bad_arguments_are_lowbit_errors(tmp_path, shapes):
    with pytest.raises(LowbitError, match="shard_size"):
        write_shards(shapes, tmp_path / "x", shard_size=0)
    with pytest.raises(LowbitError, match="image format"):
        write_shards(shapes, tmp_path / "x", image_format="gif")
    with pytest.raises(LowbitError, match="no tar shards"):
        ShardStream(tmp_path)
    assert not (tmp_path / "x").exists()


def test_labelled_set_without_captions_gets_template_captions(tmp_path):
    data = ImageTextSet("toy", [Image.new("L", (8, 8), 9)] * 3, labels=[0, 1, 0], classnames=["cat", "dog"])
    write_shards(data, tmp_path / "t", progress=False)
    assert load_shards(tmp_path / "t").captions == ["a photo of a cat.", "a photo of a dog.", "a photo of a cat."]


def test_cli_data_shard(tmp_path, capsys):
    from lowbit.cli.train import main

    assert main(["data", "shard", "shapes", "--out", str(tmp_path / "o"), "--shard-size", "5", "--limit", "12"]) == 0
    assert "wrote 12 samples in 3 shards" in capsys.readouterr().out
    assert main(["data", "shard", "nope", "--out", str(tmp_path / "p")]) == 2


def test_webdataset_reads_our_shards(shard_dir):
    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset([str(p) for p in sorted(shard_dir.glob("*.tar"))], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(N)]
    assert samples[0]["txt"].decode() == load_shards(shard_dir, limit=1).captions[0]
