"""Visual-token towers: a denser EfficientNet grid by output stride (atrous), same weights, same features."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.llava import LlavaConfig
from lowbit.models.llava_vision import default_vision, dilate_to_output_stride


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    return {os_: default_vision(128, os_)[0].eval() for os_ in (32, 16, 8)}


@pytest.mark.parametrize("output_stride, grid", [(32, 4), (16, 8), (8, 16)])
def test_output_stride_sets_the_grid(towers, output_stride: int, grid: int) -> None:
    with torch.inference_mode():
        tokens, scores = towers[output_stride](torch.randn(2, 3, 128, 128))
    assert tokens.shape == (2, grid * grid, 1280) and scores.shape == (2, grid * grid)


def test_denser_grid_keeps_the_tower_features(towers) -> None:
    """The atrous grid reads the same ImageNet features: its mean token points where the stride-32 one does."""
    from lowbit.data.vqa import load_vqa
    from lowbit.models.llava_vision import efficientnet_preprocess

    images = load_vqa("fashion-vqa", "test", limit=8).images
    pixels = efficientnet_preprocess(128)(images)
    with torch.inference_mode():
        base = towers[32](pixels)[0].mean(1)  # [B, 1280]
        dense = towers[16](pixels)[0].mean(1)
        other = dense.roll(1, dims=0)  # a different image's dense features
    same = torch.nn.functional.cosine_similarity(base, dense, dim=-1)
    cross = torch.nn.functional.cosine_similarity(base, other, dim=-1)
    assert float(same.min()) > 0.8, same
    assert float(same.mean()) > float(cross.mean()) + 0.05, (same, cross)


def test_dilation_schedule_is_deeplabs(towers) -> None:
    blocks = towers[16].net._blocks
    strides = [tuple(b._depthwise_conv.stride) for b in blocks]
    dilations = [b._depthwise_conv.dilation[0] for b in blocks]
    assert strides[11] == (1, 1) and dilations[11] == 1  # the skipped stride-2 block keeps the old dilation
    assert dilations[12:] == [2] * (len(blocks) - 12) and set(dilations[:11]) == {1}


def test_bad_output_stride_is_one_clear_error(towers) -> None:
    with pytest.raises(LowbitError, match="output_stride must be one of"):
        dilate_to_output_stride(towers[32].net, 12)
    with pytest.raises(LowbitError, match="output_stride must be one of"):
        LlavaConfig(output_stride=4).validated()
