"""Config fields shared by the three architectures, and their validation.

Every field is JSON-serialisable, so SAELens's ``to_dict`` / ``from_dict`` round trip keeps it.
Errors name the field and its allowed range.
"""

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

AUX_LOSSES = ("aux_zipf", "aux_k", "none")
AuxLoss = Literal["aux_zipf", "aux_k", "none"]


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number in the interval ``low .. high``."""
    lo_ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if lo_ok:
        lo_ok = value > low if low_open else value >= low
        lo_ok = lo_ok and (value < high if high_open else value <= high)
    if not lo_ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


def check_integer(name: str, value: Any, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``>= low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass(kw_only=True)
class AllocationFields:
    """Fields shared by every architecture here: the training step, the aux loss, running statistics.

    Args:
        sparse_training: ``True``: the sparse step (only the selected pairs go past the encoder
            matmul; see :mod:`sae_mutual_choice.fast.sparse_step`). ``False``: SAELens's dense step, the
            reference. Both give the same losses and gradients. ``"auto"`` (default): whichever
            the benchmarks show to be faster on the step's device (:func:`sparse_step_is_faster`).
        aux_loss: ``"aux_zipf"`` (latents under-used relative to a Zipf fit, dead latents
            included), ``"aux_k"`` (dead latents only: SAELens's AuxK), or ``"none"``. The
            default is per architecture, chosen from docs/results.md: ``aux_k`` for Token and
            Mutual Choice, ``aux_zipf`` for Feature Choice (docs/method.md, "Defaults").
        aux_loss_warm_up_steps: steps over which the aux coefficient ramps linearly from 0
            (through SAELens's coefficient schedulers; the value is ``aux_loss_coefficient``).
        usage_window: time constant, in training steps, of the running firing-rate statistics
            (bias-corrected EMAs). 1000 matches SAELens's default ``dead_feature_window``.
        zipf_fit_fraction: share of the rank curve, from the top, that the Zipf law is fitted to.
        underuse_ratio: a latent is under-used while it fires less than this share of its Zipf
            target rate; its aux weight grows from 0 there to 1 at no firing.
        data_parallel: each rank of the default ``torch.distributed`` process group trains on one
            slice of the batch, and selection and running statistics are those of the joined batch
            (all ranks' slices in rank order), exactly; gradients must be averaged over ranks (DDP).
            Without a process group it changes nothing. docs/method.md, "Data-parallel training".
    """

    sparse_training: bool | Literal["auto"] = "auto"
    aux_loss: AuxLoss = "aux_k"  # Feature Choice overrides it: docs/method.md, "Defaults"
    aux_loss_warm_up_steps: int = 0
    usage_window: int = 1000
    zipf_fit_fraction: float = 0.5
    underuse_ratio: float = 0.5
    data_parallel: bool = False


def validate_common(cfg: Any, *, integer_k: bool) -> None:
    """Validate the fields every architecture here has (``cfg`` is one of our configs)."""
    check_range("d_in", cfg.d_in, 1, math.inf)
    if not isinstance(cfg.data_parallel, bool):
        raise ValueError(f"data_parallel must be true or false, got {cfg.data_parallel!r}")
    if not isinstance(cfg.sparse_training, bool) and cfg.sparse_training != "auto":
        raise ValueError(f"sparse_training must be true, false or 'auto', got {cfg.sparse_training!r}")
    check_range("d_sae", cfg.d_sae, 1, math.inf)
    if integer_k and (not isinstance(cfg.k, int) or isinstance(cfg.k, bool)):
        raise ValueError(f"k must be an integer in [1, d_sae={cfg.d_sae}], got {cfg.k!r}")
    check_range("k", cfg.k, 0, cfg.d_sae, low_open=True)
    check_choice("aux_loss", cfg.aux_loss, AUX_LOSSES)
    check_range("aux_loss_coefficient", cfg.aux_loss_coefficient, 0, math.inf)
    check_integer("aux_loss_warm_up_steps", cfg.aux_loss_warm_up_steps, 0)
    check_integer("usage_window", cfg.usage_window, 1)
    check_range("zipf_fit_fraction", cfg.zipf_fit_fraction, 0, 1, low_open=True)
    check_range("underuse_ratio", cfg.underuse_ratio, 0, 1, low_open=True)
    if cfg.use_sparse_activations:
        raise ValueError(
            f"use_sparse_activations must be False for {cfg.architecture()}: its training step keeps "
            "activations sparse already (sparse_training), and its export takes dense inputs"
        )
    if cfg.aux_loss != "none" and cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(
            f"aux_loss={cfg.aux_loss!r} does not support normalize_activations="
            f"{cfg.normalize_activations!r} (the aux reconstruction would live in normalised space "
            "while the residual does not); set aux_loss='none' or another normalisation"
        )


def sparse_step_is_faster(device: torch.device) -> bool:
    """``sparse_training="auto"``'s rule: the sparse step on CPU, SAELens's dense step elsewhere.

    On CPU the sparse step took 0.23-0.39x SAELens topk's step time at both benchmarked shapes
    (docs/performance.md); no other device has been measured yet, and there the dense step, SAELens's
    own, is the one no user can be slower than. ``benchmarks/gpu.sh`` gives the CUDA figures to revise it.
    """
    return device.type == "cpu"
