"""Two gloo processes give the one-process loss and gradients (spawned with torch.multiprocessing)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from lowbit.train import distributed as D
from lowbit.train.losses import clip_loss, siglip_loss

WORLD, B, DIM = 2, 3, 5  # 2 ranks x 3 local pairs = a global batch of 6


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(WORLD * B, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(WORLD * B, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


IDS = torch.tensor([0, 1, 0, 2, 0, 1])  # caption ids of the global batch: repeats across the two ranks
NAMES = ("clip", "siglip", "clip_ids", "siglip_ids")


def _losses(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    return {"clip": clip_loss(img, txt, scale), "siglip": siglip_loss(img, txt, scale, bias),
            "clip_ids": clip_loss(img, txt, scale, text_ids=ids),
            "siglip_ids": siglip_loss(img, txt, scale, bias, text_ids=ids)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert D.init_distributed() == (rank, WORLD) and D.is_distributed()
        img_all, txt_all = _global_batch()
        gathered = D.all_gather_with_grad(img_all[rank * B : (rank + 1) * B])
        assert torch.equal(gathered, img_all)  # rank order
        result = {}
        for name in NAMES:
            img = img_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
            txt = txt_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
            loss = _losses(img, txt, IDS[rank * B : (rank + 1) * B])[name]
            loss.backward()
            result[name] = {"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_losses_and_gradients_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in NAMES:
        img, txt = _global_batch()
        img.requires_grad_(True)
        txt.requires_grad_(True)
        single = _losses(img, txt, IDS)[name]
        single.backward()
        # Each rank's loss is its local rows' mean: the mean over ranks is the global-batch loss.
        mean = sum(r[name]["loss"] for r in ranks) / WORLD
        assert float(mean) == pytest.approx(float(single.detach()), rel=1e-12)
        # Each rank's features receive the gradient of every rank's loss (W x the mean's); DDP then
        # averages parameter gradients over the W ranks, which gives back the one-process gradient.
        for r in range(WORLD):
            rows = slice(r * B, (r + 1) * B)
            torch.testing.assert_close(ranks[r][name]["img_grad"] / WORLD, img.grad[rows], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(ranks[r][name]["txt_grad"] / WORLD, txt.grad[rows], rtol=1e-10, atol=1e-12)


def test_single_process_helpers_degrade_gracefully():
    assert D.init_distributed() == (0, 1)
    assert D.rank() == 0 and D.world_size() == 1 and D.is_main() and not D.is_distributed()
    x = torch.ones(2, 3, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    assert torch.equal(D.all_reduce_mean(torch.tensor(2.0)), torch.tensor(2.0))
