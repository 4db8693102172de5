"""GPTQ: second-order, error-compensating weight quantization of one [N, K] weight.

Frantar, Ashkboos, Hoefler, Alistarh (2022), "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323.

Columns of W are quantized one at a time (in order, or by descending Hessian diagonal with ``act_order``);
after each column the quantization error is spread over the not-yet-quantized columns through the
Cholesky factor of the inverse Hessian H = 2/S XᵀX of the layer's calibration inputs, so the layer output
XWᵀ is preserved much better than by round-to-nearest. Updates are applied lazily per block of columns
(``block_size``) as in the paper.

Scales and codes come from :mod:`lowbit.quant.primitives`, so the packed weight dequantizes to exactly the
matrix GPTQ produced. With ``act_order`` and groups, all group scales are computed up front from the
unpermuted weight on the ORIGINAL group indices ("static groups"), so the result is stored in the standard
packed format with no permutation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lowbit.errors import LowbitError
from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options
from lowbit.quant.primitives import (
    QuantSpec,
    codes_to_weights,
    compute_scales,
    packed_from_codes,
    round_to_codes,
    to_packed,
)

_OPTIONS = {"percdamp", "block_size", "act_order", "static_groups"}
_MAX_DAMP_RETRIES = 6  # each retry multiplies the dampening by 10 when Cholesky fails


@dataclass
class GPTQOutput:
    """What :func:`gptq_quantize` returns: integer codes, their scales/zeros and the dequantized weight."""

    codes: torch.Tensor  # uint8 [N, K], original column order
    scales: torch.Tensor  # float32 [N, G] (fp16-representable)
    zeros: torch.Tensor  # float32 [N, G]
    weight: torch.Tensor  # float32 [N, K] = dequantize(codes), the matrix GPTQ settled on
    perm: torch.Tensor | None  # column order used with act_order, else None


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2/S XᵀX (float64 [K, K]) from calibration rows X [S, K]."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)  # [S, K]
    return (2.0 / max(x.shape[0], 1)) * (x.T @ x)


def _inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp * mean(diag H), in float64.

    If H is too ill-conditioned for the factorisation (few calibration rows, float error), λ grows 10x per
    retry rather than failing the whole model.
    """
    k = hessian.shape[0]
    mean_diag = torch.diagonal(hessian).mean().item()
    unit = mean_diag if mean_diag > 0 else 1.0
    damp = percdamp * unit
    eye = torch.eye(k, dtype=hessian.dtype)
    for _ in range(_MAX_DAMP_RETRIES):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            # cholesky_solve rather than cholesky_inverse: the latter stalls for seconds on a busy 2-core box
            hinv = torch.cholesky_solve(eye, lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        damp = max(damp * 10.0, 1e-4 * unit)  # also escapes percdamp = 0
    raise LowbitError(
        f"GPTQ: the calibration Hessian ({k}x{k}) is not positive definite even with dampening {damp:.3g}; "
        "use more calibration samples or a larger 'percdamp'"
    )


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run the column loop on one thread: its ops touch a few thousand floats each, so intra-op threading
    costs more in fork/join than it saves (measured 4x slower with 2 threads on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quantize_block(
    w1: torch.Tensor,
    err1: torch.Tensor,
    hinv1: torch.Tensor,
    i1: int,
    perm: torch.Tensor | None,
    gs: int | None,
    dynamic_groups: bool,
    spec: QuantSpec,
    scales_t: torch.Tensor,
    zeros_t: torch.Tensor,
    codes_t: torch.Tensor,
    q_t: torch.Tensor,
) -> None:
    """Quantize the block's columns w1 [B, N] (transposed) in place, filling err1 [B, N] and codes/values."""
    order = perm.tolist() if perm is not None else None
    for i in range(w1.shape[0]):
        col = i1 + i
        orig = order[col] if order is not None else col
        g = 0 if gs is None else orig // gs
        if dynamic_groups and col % gs == 0:  # type: ignore[operator]
            s_new, z_new = compute_scales(w1[i : i + gs].T, spec)  # group slice [N, <=gs] -> [N, 1]
            scales_t[g], zeros_t[g] = s_new[:, 0], z_new[:, 0]
        s, z = scales_t[g], zeros_t[g]  # [N]
        # the packed format's own elementwise rounding/dequantization, so packing reproduces q exactly
        c = round_to_codes(w1[i], s, z, spec)  # [N] uint8
        q = codes_to_weights(c, s, z, spec)  # [N] float32
        codes_t[col] = c
        q_t[col] = q
        e = (w1[i] - q) / hinv1[i, i]  # [N]
        # why: compensate the rounding error on the remaining columns of this block (OBS update)
        w1[i + 1 :].addr_(hinv1[i, i + 1 :], e, alpha=-1.0)
        err1[i] = e


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQOutput:
    """Quantize ``weight`` [N, K] with GPTQ given the layer Hessian [K, K] (any positive multiple of XᵀX).

    ``act_order`` visits columns by descending diag(H); ``static_groups`` (implied by ``act_order`` when
    grouped) computes every group's scales up front from the unpermuted weight instead of when the group
    starts.
    """
    if weight.dim() != 2:
        raise LowbitError(f"GPTQ expects a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise LowbitError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match weight K={k}")
    if not bool(torch.isfinite(hessian).all()):
        raise LowbitError("GPTQ: the calibration Hessian has non-finite entries (NaN/inf activations?)")
    if block_size < 1 or percdamp < 0:
        raise LowbitError(f"GPTQ: need block_size >= 1 and percdamp >= 0, got {block_size}, {percdamp}")

    w = weight.detach().to(torch.float32).clone()  # [N, K]
    h = hessian.detach().to(torch.float64).clone()  # [K, K]

    # Inputs that were always zero carry no information: pin their Hessian diagonal and drop the weight.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    gs = spec.group_size if spec.group_size is not None and spec.group_size < k else None
    n_groups = spec.num_groups(k)
    scales = torch.empty(n, n_groups, dtype=torch.float32)
    zeros = torch.empty(n, n_groups, dtype=torch.float32)
    dynamic_groups = gs is not None and not (static_groups or act_order)
    if gs is None:
        scales[:], zeros[:] = compute_scales(w, spec)  # per-channel: one scale from the whole row
    elif not dynamic_groups:
        for g in range(n_groups):  # static: all groups from the (unpermuted) weight before any update
            # a slice no wider than the group size is one group for compute_scales -> [N, 1]
            scales[:, g : g + 1], zeros[:, g : g + 1] = compute_scales(w[:, g * gs : (g + 1) * gs], spec)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = _inverse_hessian_cholesky(h, percdamp).to(torch.float32)  # upper [K, K]

    # A dynamic group must lie inside one block so its scales see all earlier in-block updates.
    if dynamic_groups:
        assert gs is not None
        block_size = max(gs, block_size // gs * gs)

    # Work on transposed copies so each column (and each remaining-column update) is a contiguous row.
    wt = w.T.contiguous()  # [K, N]
    scales_t, zeros_t = scales.T.contiguous(), zeros.T.contiguous()  # [G, N]
    codes_t = torch.empty(k, n, dtype=torch.uint8)  # in visiting order; un-permuted at the end
    q_t = torch.empty(k, n, dtype=torch.float32)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()  # [B, N]
        err1 = torch.empty_like(w1)  # [B, N]
        hinv1 = hinv[i1:i2, i1:i2]  # [B, B]
        with _single_thread():
            _quantize_block(w1, err1, hinv1, i1, perm, gs, dynamic_groups, spec, scales_t, zeros_t, codes_t, q_t)
        # lazy batch update: the columns after this block receive the whole block's error at once
        wt[i2:] -= hinv[i1:i2, i2:].T @ err1  # [K-i2, B] @ [B, N]

    codes, q_all = codes_t.T, q_t.T  # [N, K]
    scales, zeros = scales_t.T.contiguous(), zeros_t.T.contiguous()  # [N, G]
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        q_all = q_all[:, inv]
    codes, q_all = codes.contiguous(), q_all.contiguous()
    return GPTQOutput(codes=codes, scales=scales, zeros=zeros, weight=q_all, perm=perm)


def _parse_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    opts = dict(options or {})
    check_options("gptq", opts, _OPTIONS)
    out: dict[str, Any] = {}
    for key, kind in (("percdamp", float), ("block_size", int)):
        if key in opts:
            val = opts[key]
            if isinstance(val, bool) or not isinstance(val, (int, float)) or (kind is int and val != int(val)):
                raise LowbitError(f"gptq option {key!r} must be a {kind.__name__}, got {val!r}")
            out[key] = kind(val)
    for key in ("act_order", "static_groups"):
        if key in opts:
            if not isinstance(opts[key], bool):
                raise LowbitError(f"gptq option {key!r} must be true/false, got {opts[key]!r}")
            out[key] = opts[key]
    return out


class GPTQMethod:
    """The ``gptq`` entry of :data:`lowbit.quant.methods.METHODS`.

    Options: ``percdamp`` (0.01), ``block_size`` (128), ``act_order`` (False), ``static_groups`` (False).
    """

    name = "gptq"
    needs_calibration = True

    def quantize_weight(
        self,
        weight: torch.Tensor,
        spec: QuantSpec,
        ctx: QuantContext | None,
        options: Mapping[str, Any] | None = None,
    ) -> QuantResult:
        """GPTQ-quantize ``weight`` [N, K] using the Hessian (or inputs) in ``ctx``."""
        opts = _parse_options(options)
        if ctx is not None and ctx.extra.get("n_rows") == 0:  # layer never ran on calibration data
            return QuantResult(packed=to_packed(weight, spec), input_scale=None)
        hessian = None if ctx is None else ctx.hessian
        if hessian is None and ctx is not None and ctx.inputs is not None:
            hessian = hessian_from_inputs(ctx.inputs)
        if hessian is None:
            raise LowbitError("method 'gptq' needs calibration data (a Hessian or input rows); none was given")
        w2 = weight.detach().reshape(weight.shape[0], -1)  # [N, K]
        out = gptq_quantize(w2, hessian, spec, **opts)
        packed = packed_from_codes(out.codes, out.scales, out.zeros, spec, tuple(weight.shape))
        return QuantResult(packed=packed, input_scale=None)


GPTQ = METHODS.register("gptq")(GPTQMethod())
