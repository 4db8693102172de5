"""Round-to-nearest (RTN) weight quantization: the calibration-free baseline.

Each weight is rounded to the nearest level of a per-group uniform grid (see ``lowbit.quant.primitives``), as
the RTN baseline of Dettmers et al., "LLM.int8()" (2022, arXiv:2208.07339) and of GPTQ (Frantar et al. 2023,
arXiv:2210.17323).
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.quant.methods import METHODS, QuantContext, QuantResult, check_options
from lowbit.quant.primitives import QuantSpec, to_packed


class RTN:
    """Round-to-nearest; no calibration, no options."""

    needs_calibration = False

    def quantize_weight(
        self, weight: torch.Tensor, spec: QuantSpec, ctx: QuantContext, options: dict[str, Any]
    ) -> QuantResult:
        """Pack ``weight`` [N, K] on the RTN grid."""
        check_options("rtn", options, ())
        return QuantResult(packed=to_packed(weight, spec))


METHODS.register("rtn")(RTN())
