"""PB-LLM storage: a binary packed weight plus a compact CSR side structure of 8-bit salient residuals.

Shang, Yuan, Wu, Dong, Wu (2023), "PB-LLM: Partially Binarized Large Language Models", arXiv:2310.00034:
a small fraction of salient weights stays at higher precision, the rest is binarized.

Stored per layer (weight [N, K]), under the module's state-dict prefix:

| buffer             | dtype                       | shape          | meaning |
|--------------------|-----------------------------|----------------|---------|
| ``qweight``        | uint8                       | [N, ceil(K/8)] | 1-bit codes of EVERY weight (PACKED_FORMAT.md) |
| ``scales``         | float16                     | [N, G]         | binary scales: w_b = (q - 1/2) * 2 * s |
| ``side_row_ptr``   | int32                       | [N + 1]        | CSR row pointers into the next two |
| ``side_cols``      | int16 (K <= 32767) or int32 | [nnz]          | column of each salient weight, ascending per row |
| ``side_values``    | int8                        | [nnz]          | residual codes in [-127, 127] |
| ``side_row_scale`` | float16                     | [N]            | per-row residual step |

``W[n, k] = w_b[n, k] + side_values[j] * side_row_scale[n]`` for the entry j of (n, k), else ``w_b[n, k]``
(float32). The side holds the RESIDUAL of salient weights over their binary value, so the layer is exactly
"binary matmul + sparse matmul" — a fast binary kernel plus a sparse add could run it without touching the
binary part. The salient weights' own bits in ``qweight`` cost 1 bit each; keeping the bitstream dense keeps
the binary part in the standard format. Effective bits per weight = 8 * (all bytes above) / (N * K).

These modules always compute through the dequantized weight (the reference path, cached), whatever
``backend`` says: a fast binary kernel does not know the side structure.

Example:
    >>> import torch
    >>> from lowbit.kernels.sparse_side import side_from_dense, side_to_dense
    >>> r = torch.zeros(2, 4); r[0, 1] = 0.5
    >>> ptr, cols, vals, rs = side_from_dense(r, r != 0)
    >>> side_to_dense(ptr, cols, vals, rs, 4)[0, 1].item()
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.kernels.formats import PackedWeight
from lowbit.kernels.quant_linear import reference_backend
from lowbit.kernels.variants import ExtraPackedMixin, ShapeSpec, variant_family

SIDE_QMAX = 127  # symmetric int8 residual codes in [-127, 127]
_FP16_MIN = 2.0**-24
_FP16_MAX = 65504.0


def col_dtype(k: int) -> torch.dtype:
    """Column-index dtype for K input features: int16 when every column fits, else int32."""
    return torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32


def side_row_scales(residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row step max|r| / 127 over the masked entries, fp16-representable with magnitude rounded up.

    Rounding up never shrinks the step, so the row's largest residual stays on the grid. Rows without
    salient weights get the smallest positive fp16 value. Returns float32 [N].
    """
    amax = (residual.abs() * mask).amax(dim=1) if residual.numel() else residual.new_zeros(residual.shape[0])
    step = (amax / SIDE_QMAX).clamp(_FP16_MIN, _FP16_MAX)
    h = step.to(torch.float16)
    h = torch.where(h.to(torch.float32) < step, torch.nextafter(h, torch.full_like(h, _FP16_MAX)), h)
    return h.to(torch.float32)


def side_codes(residual: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise int8 residual codes round(r / step) clipped to [-127, 127]; ``row_scale`` [N] or [N, 1]."""
    step = row_scale.reshape(-1, 1).to(torch.float16).to(torch.float32)
    return torch.round(residual.to(torch.float32) / step).clamp(-SIDE_QMAX, SIDE_QMAX).to(torch.int8)


def side_values_dense(codes: torch.Tensor, row_scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The dense float32 side [N, K] from elementwise codes, fp16 row steps [N] and the salient mask."""
    step = row_scale.reshape(-1, 1).to(torch.float16).to(torch.float32)
    return torch.where(mask, codes.to(torch.float32) * step, torch.zeros((), dtype=torch.float32))


def side_from_dense(
    residual: torch.Tensor, mask: torch.Tensor, row_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR (row_ptr int32 [N+1], cols [nnz], int8 values [nnz], fp16 row_scale [N]) of ``residual`` at ``mask``.

    ``row_scale`` defaults to ``side_row_scales``; pass a learned one (QAT) to store exactly that grid.
    """
    if residual.dim() != 2 or mask.shape != residual.shape:
        raise LowbitError(f"side_from_dense: residual {tuple(residual.shape)} and mask {tuple(mask.shape)} "
                          "must be the same 2-D shape [N, K]")
    n, k = residual.shape
    mask = mask.to(torch.bool)
    rs = side_row_scales(residual, mask) if row_scale is None else row_scale.reshape(-1).to(torch.float32)
    codes = side_codes(residual, rs)  # [N, K]
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: rows ascending, columns ascending per row
    counts = torch.bincount(rows, minlength=n)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return row_ptr, cols.to(col_dtype(k)), codes[rows, cols], rs.to(torch.float16)


def side_to_dense(
    row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, row_scale: torch.Tensor, k: int
) -> torch.Tensor:
    """The dense float32 side [N, K] (zeros outside the salient set) of a CSR side structure."""
    n = row_ptr.numel() - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)  # [N]
    rows = torch.repeat_interleave(torch.arange(n), counts)  # [nnz]
    out = torch.zeros(n, k, dtype=torch.float32)
    step = row_scale.to(torch.float32)[rows]  # [nnz]
    out[rows, cols.to(torch.int64)] = values.to(torch.float32) * step
    return out


@dataclass
class SparseSidePacked(PackedWeight):
    """A ``PackedWeight`` (the binary part) plus the CSR side structure of the module docstring."""

    row_ptr: torch.Tensor  # int32 [N + 1]
    cols: torch.Tensor  # int16 / int32 [nnz]
    values: torch.Tensor  # int8 [nnz]
    row_scale: torch.Tensor  # float16 [N]

    def __post_init__(self) -> None:
        super().__post_init__()
        n, k = self.out_features, self.in_features
        nnz = self.values.numel()
        checks = [
            ("row_ptr", self.row_ptr, (n + 1,), (torch.int32,)),
            ("cols", self.cols, (nnz,), (col_dtype(k), torch.int32)),
            ("values", self.values, (nnz,), (torch.int8,)),
            ("row_scale", self.row_scale, (n,), (torch.float16,)),
        ]
        for name, t, shape, dtypes in checks:
            if tuple(t.shape) != shape or t.dtype not in dtypes:
                raise LowbitError(f"SparseSidePacked.{name}: received {t.dtype} {tuple(t.shape)}; expected "
                                  f"{' or '.join(map(str, dtypes))} {shape} for weight shape {self.shape}")
        if int(self.row_ptr[0]) != 0 or int(self.row_ptr[-1]) != nnz:
            raise LowbitError(f"SparseSidePacked.row_ptr must start at 0 and end at nnz={nnz}")

    @property
    def nnz(self) -> int:
        """Number of salient (side) weights."""
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        """Stored bytes: binary part (qweight + scales) + row_ptr + cols + values + row_scale."""
        side = (self.row_ptr, self.cols, self.values, self.row_scale)
        return super().nbytes + sum(t.numel() * t.element_size() for t in side)

    def side_dense(self) -> torch.Tensor:
        """The float32 residual [N, K] the side adds to the binary weight."""
        return side_to_dense(self.row_ptr, self.cols, self.values, self.row_scale, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """Float32 [N, K]: binary part + side residual."""
        return super().dequantize() + self.side_dense()


class _SideMixin(ExtraPackedMixin):
    EXTRA_FIELDS = {"side_row_ptr": "row_ptr", "side_cols": "cols", "side_values": "values",
                    "side_row_scale": "row_scale"}
    RESIZABLE = ("side_cols", "side_values")
    PACKED_TYPE = SparseSidePacked

    def _extra_shapes(self) -> dict[str, ShapeSpec]:
        n, k = self.weight_shape[0], int(torch.Size(self.weight_shape[1:]).numel())
        return {"side_row_ptr": ((n + 1,), torch.int32), "side_cols": ((0,), col_dtype(k)),
                "side_values": ((0,), torch.int8), "side_row_scale": ((n,), torch.float16)}

    @property
    def packed(self) -> SparseSidePacked:
        """The stored buffers as a ``SparseSidePacked`` (shares memory)."""
        b = self._buffers  # type: ignore[attr-defined]
        return SparseSidePacked(b["qweight"], b["scales"], b.get("zeros"), self.bits, self.group_size,  # type: ignore[attr-defined]
                                self.weight_shape, b["side_row_ptr"], b["side_cols"], b["side_values"],
                                b["side_row_scale"])

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return reference_backend(self, x)  # type: ignore[arg-type]  # the side must be added: no fast path yet

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, side nnz={self._buffers['side_values'].numel()}"  # type: ignore[misc,attr-defined]


PBLLMLinear, PBLLMConv2d1x1, PBLLMWeightParam, PBLLM_KINDS = variant_family(
    "pbllm", _SideMixin, "PBLLM", "a PB-LLM side structure")
