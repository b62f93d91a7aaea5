"""Bias-corrected exponential moving averages, kept in SAE buffers.

An EMA that starts at 0 underestimates its target until about ``1 / rate`` updates have been
made (SAELens's BatchTopK threshold has exactly this defect). Each average here is stored as the
raw EMA together with its *weight*, the same EMA applied to the constant 1
(``1 - (1 - rate) ** updates``), and read through :func:`debiased` as ``raw / weight``, the
correction Adam applies to its moments. Setting ``raw = value, weight = 1`` pins an estimate to a
known value (used by the exact threshold calibration).
"""

import torch


@torch.no_grad()
def ema_update_(
    raw: torch.Tensor,
    weight: torch.Tensor,
    value: torch.Tensor,
    rate: float,
    where: torch.Tensor | None = None,
) -> None:
    """In place: ``raw <- (1 - rate) raw + rate value`` and ``weight <- (1 - rate) weight + rate``.

    With ``where`` (a boolean tensor broadcastable to ``raw``), only those entries are updated.
    """
    new_raw = (1 - rate) * raw + rate * value.to(raw.dtype)
    new_weight = (1 - rate) * weight + rate
    if where is None:
        raw.copy_(new_raw)
        weight.copy_(new_weight)
    else:
        raw.copy_(torch.where(where, new_raw, raw))
        weight.copy_(torch.where(where, new_weight, weight))


def debiased(raw: torch.Tensor, weight: torch.Tensor, unset: float = 0.0) -> torch.Tensor:
    """The bias-corrected average ``raw / weight``; entries never updated read as ``unset``."""
    return torch.where(weight > 0, raw / weight.clamp(min=torch.finfo(weight.dtype).tiny), unset)
