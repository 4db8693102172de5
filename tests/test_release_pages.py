"""``io.release_pages``: the resident pages of a memory-mapped checkpoint tensor are dropped once it has been
read into another form, the values stay readable (mapped again from the page cache), and a tensor written in
memory keeps its writes (it is never released)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from lowbit.io import mmap_safetensors, release_pages


def rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


def test_release_pages_drops_resident_pages_and_keeps_values(tmp_path: Path) -> None:
    big = torch.arange(8 * 2**20, dtype=torch.int32).to(torch.uint8).reshape(4096, 2048)  # 8 MB
    save_file({"big": big, "small": torch.ones(3), "other": torch.zeros(2**20, dtype=torch.uint8)},
              str(tmp_path / "m.safetensors"))
    state = mmap_safetensors(tmp_path / "m.safetensors")
    assert torch.equal(state["big"], big)  # every page touched
    before = rss_file_kb()
    released = release_pages(state["big"])
    assert 8 * 2**20 - 2 * 4096 <= released <= 8 * 2**20  # whole pages inside the tensor only
    assert rss_file_kb() < before - 6 * 1024  # the resident set shrank by about the tensor
    assert torch.equal(state["big"], big)  # read again: the same bytes
    assert release_pages(torch.ones(10)) == 0  # not a mapped tensor
    with torch.inference_mode():  # mapped under inference mode: no version counter, so never released
        assert release_pages(mmap_safetensors(tmp_path / "m.safetensors")["big"]) == 0
    state["other"].add_(1)  # written in memory: copy-on-write pages that must not be dropped
    assert release_pages(state["other"]) == 0
    assert int(state["other"].sum()) == 2**20
