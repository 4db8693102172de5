"""Loss values on a fixed toy batch against straightforward reference computations, and FLIP patch dropping."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.train.losses import clip_loss, distill_kl_loss, embedding_cosine_loss, siglip_loss
from lowbit.train.patch_dropout import drop_patches, enable_patch_dropout


def _batch(b: int = 5, d: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def _dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def test_clip_loss_matches_explicit_softmax_sums():
    img, txt = _batch()
    t = 8.0
    b = len(img)
    total = 0.0
    for i in range(b):  # image i should pick text i among all texts, and text i image i among all images
        row = [t * _dot(img[i], txt[j]) for j in range(b)]
        col = [t * _dot(txt[i], img[j]) for j in range(b)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    expected = total / (2 * b)
    got = clip_loss(img, txt, torch.tensor(math.log(t), dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_clip_loss_clamps_temperature_at_100():
    img, txt = _batch()
    high = clip_loss(img, txt, torch.tensor(math.log(1000.0)))
    at_cap = clip_loss(img, txt, torch.tensor(math.log(100.0)))
    assert float(high) == pytest.approx(float(at_cap), rel=1e-6)


def test_siglip_loss_matches_explicit_pairwise_sum():
    img, txt = _batch()
    t, bias = 10.0, -4.0
    b = len(img)
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            logit = t * _dot(img[i], txt[j]) + bias
            total += math.log(1 + math.exp(-z * logit))  # -log sigmoid(z * logit)
    expected = total / b
    got = siglip_loss(img, txt, torch.tensor(math.log(t), dtype=torch.float64), torch.tensor(bias, dtype=torch.float64))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_identical_caption_positives_match_explicit_soft_targets():
    img, txt = _batch(6)
    ids = torch.tensor([0, 1, 0, 2, 1, 0])
    t, bias = 8.0, -2.0
    b = len(img)
    total = 0.0
    for i in range(b):
        pos = [j for j in range(b) if ids[j] == ids[i]]
        for logits in ([t * _dot(img[i], txt[j]) for j in range(b)], [t * _dot(txt[i], img[j]) for j in range(b)]):
            lse = math.log(sum(math.exp(v) for v in logits))
            total += -sum(logits[j] - lse for j in pos) / len(pos)  # uniform target over the positives
    expected = total / (2 * b)
    scale = torch.tensor(math.log(t), dtype=torch.float64)
    assert float(clip_loss(img, txt, scale, text_ids=ids)) == pytest.approx(expected, rel=1e-6)
    sig = sum(math.log(1 + math.exp(-(1.0 if ids[i] == ids[j] else -1.0) * (t * _dot(img[i], txt[j]) + bias)))
              for i in range(b) for j in range(b)) / b
    got = siglip_loss(img, txt, scale, torch.tensor(bias, dtype=torch.float64), text_ids=ids)
    assert float(got) == pytest.approx(sig, rel=1e-6)
    distinct = torch.arange(b)  # all captions different: the standard losses
    assert float(clip_loss(img, txt, scale, text_ids=distinct)) == pytest.approx(float(clip_loss(img, txt, scale)))


def test_learnable_temperature_and_bias_get_gradients():
    img, txt = _batch()
    scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    (clip_loss(img, txt, scale) + siglip_loss(img, txt, scale, bias)).backward()
    assert scale.grad is not None and float(scale.grad) != 0.0 and float(bias.grad) != 0.0


def test_distill_kl_matches_explicit_kl_both_directions():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64)
    te = torch.randn(4, 6, generator=g, dtype=torch.float64)
    temp = 2.0

    def kl_rows(student, teacher):
        out = 0.0
        for srow, trow in zip(student, teacher, strict=True):
            p = torch.softmax(trow / temp, dim=0)
            q = torch.softmax(srow / temp, dim=0)
            out += float((p * (p.log() - q.log())).sum())
        return out / len(student)

    expected = 0.5 * (kl_rows(s, te) + kl_rows(s.T, te.T)) * temp**2
    assert float(distill_kl_loss(s, te, temp)) == pytest.approx(expected, rel=1e-6)
    assert float(distill_kl_loss(te, te, temp)) == pytest.approx(0.0, abs=1e-9)


def test_distill_kl_does_not_backprop_into_teacher():
    s = torch.randn(3, 3, requires_grad=True)
    te = torch.randn(3, 3, requires_grad=True)
    distill_kl_loss(s, te).backward()
    assert s.grad is not None and te.grad is None


def test_embedding_cosine_matches_reference():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    expected = sum(1 - _dot(x, y) / (x.norm() * y.norm()) for x, y in zip(a, b, strict=True)) / 5
    assert float(embedding_cosine_loss(a, b)) == pytest.approx(float(expected), rel=1e-5)


def test_drop_patches_keeps_prefix_and_an_ordered_subset():
    torch.manual_seed(0)
    tokens = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 9, 1).expand(2, 9, 3).contiguous()
    out = drop_patches(tokens, 0.5, n_prefix=1)
    assert out.shape == (2, 1 + 4, 3)  # ceil(8 * 0.5) patches kept
    for b in range(2):
        ids = out[b, :, 0].tolist()
        assert ids[0] == tokens[b, 0, 0]  # the class token stays first
        assert ids == sorted(ids) and len(set(ids)) == len(ids)  # spatial order kept, no repeats
    assert torch.equal(drop_patches(tokens, 0.0, n_prefix=1), tokens)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_patch_dropout_hook_shortens_training_sequences_only(kind):
    from lowbit.train.presets import build_dual_encoder

    torch.manual_seed(0)
    model = build_dual_encoder("tiny", vocab_size=20, kind=kind)
    vision = model.vision_model
    seen: list[int] = []
    vision.encoder.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]),
                                             with_kwargs=True)
    handle = enable_patch_dropout(vision, 0.75)
    pixels = torch.randn(2, 3, 32, 32)
    vision.train()
    vision(pixel_values=pixels)
    vision.eval()
    vision(pixel_values=pixels)
    prefix = 1 if kind == "clip" else 0
    assert seen == [prefix + 4, prefix + 16]  # 16 patches -> 4 kept in training, all 16 in eval
    handle.remove()
    with pytest.raises(LowbitError, match="patch dropout"):
        enable_patch_dropout(vision, 1.0)
