"""Evaluate per-token (exported) SAEs on held-out text: SAELens's eval suite plus allocation diagnostics.

SAELens's ``run_evals`` gives explained variance, MSE, CE loss recovered and L0. On top, the
diagnostics this package is about: the spread of per-token L0, dead latents (no firing on the
held-out tokens), dense latents (firing on more than ``DENSE_DENSITY`` of them), normalised MSE,
and the latent density-versus-rank curve with its Zipf fit.

Adaptive SAEs (exported as JumpReLU: Mutual and Feature Choice, SAELens's BatchTopK) fire about k
latents per token on the text they were calibrated on, not exactly k on other text. For equal-
sparsity comparisons, :func:`at_k` recalibrates a copy on the evaluation text itself so that its
mean L0 there is exactly k: one global threshold when the SAE has one, else per-latent thresholds
keeping each latent's share of the firing. Its metrics are reported beside the plain ones.
"""

import copy
import math
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.util import get_special_token_ids
from tqdm.auto import tqdm

from sae_mutual_choice.upstream.adaptive_allocation import batch_budget, fitted_zipf, round_capacities
from sae_mutual_choice.upstream.feature_choice_sae import demand_capacities
from sae_mutual_choice.upstream.mutual_choice_sae import latent_blocks, latent_scores, thresholds_for_counts

DENSE_DENSITY = 0.1
ZIPF_FIT_FRACTION = 0.5


def fit_zipf(statistic: torch.Tensor, fit_fraction: float) -> tuple[float, float]:
    """:func:`~sae_mutual_choice.upstream.adaptive_allocation.fitted_zipf` read on the host:
    ``(exponent, log_scale)``; ``(0.0, -inf)`` when fewer than two positive points are available."""
    exponent, log_scale = fitted_zipf(statistic, fit_fraction)
    return float(exponent), float(log_scale)


def special_token_ids(model: Any) -> list[int]:
    """The model tokenizer's special tokens (BOS, EOS, ...), which SAELens can leave out; none without a tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    return [] if tokenizer is None else sorted(get_special_token_ids(tokenizer))


@torch.no_grad()
def held_out_activations(model: Any, store: ActivationsStore, hook_name: str, n_batches: int) -> torch.Tensor:
    """``[N, d_in]`` activations at ``hook_name`` for ``n_batches`` held-out token batches (see
    :func:`token_activations`)."""
    batches = (store.get_batch_tokens() for _ in range(n_batches))
    return torch.cat(
        [
            token_activations(model, tokens, hook_name)
            for tokens in tqdm(batches, total=n_batches, desc="held-out activations", leave=False)
        ]
    )


@torch.no_grad()
def token_activations(model: Any, tokens: torch.Tensor, hook_name: str) -> torch.Tensor:
    """``[N, d_in]`` float32 activations (on the CPU) at ``hook_name`` for token rows ``[batch, seq]``.

    Positions holding special tokens are left out, as SAELens's ``exclude_special_tokens`` does:
    their residual norms are orders of magnitude larger than ordinary tokens'.
    """
    layer = _layer_of(hook_name)
    special = torch.tensor(special_token_ids(model), dtype=torch.long)
    _, cache = model.run_with_cache(
        tokens, names_filter=[hook_name], stop_at_layer=None if layer is None else layer + 1
    )
    keep = ~torch.isin(tokens.flatten().cpu(), special)
    return cache[hook_name].reshape(-1, cache[hook_name].shape[-1]).float().cpu()[keep]


@torch.no_grad()
def allocation_diagnostics(
    sae: SAE[Any], activations: torch.Tensor, batch_size: int = 4096
) -> dict[str, Any]:
    """Per-token L0 spread, dead/dense latents, normalised MSE and the density-vs-rank Zipf fit."""
    l0s, fired_counts, squared_error = [], torch.zeros(sae.cfg.d_sae), 0.0
    for start in range(0, activations.shape[0], batch_size):
        x = activations[start : start + batch_size].to(sae.device)
        acts = sae.encode(x)
        fired = acts > 0
        l0s.append(fired.sum(-1).cpu())
        fired_counts += fired.sum(0).float().cpu()
        squared_error += float((sae.decode(acts) - x).pow(2).sum())
    l0 = torch.cat(l0s).float()
    density = fired_counts / activations.shape[0]
    exponent, log_scale = fit_zipf(density, ZIPF_FIT_FRACTION)
    variance = float((activations - activations.mean(0)).pow(2).sum())
    return {
        "l0_mean": float(l0.mean()),
        "l0_min": float(l0.min()),
        "l0_median": float(l0.median()),
        "l0_p90": float(l0.quantile(0.9)),
        "l0_max": float(l0.max()),
        "dead_latents": int((fired_counts == 0).sum()),
        "dense_latents": int((density > DENSE_DENSITY).sum()),
        "normalized_mse": squared_error / variance,
        "density_zipf_exponent": exponent,
        "density_zipf_log_scale": log_scale if math.isfinite(log_scale) else None,
        "density_by_rank": torch.sort(density, descending=True).values.tolist(),
        "l0_histogram": torch.bincount(l0.long()).tolist(),
        "held_out_tokens": int(activations.shape[0]),
    }


def saelens_metrics(sae: SAE[Any], model: Any, store: ActivationsStore, n_batches: int) -> dict[str, Any]:
    """SAELens's ``run_evals``: explained variance, MSE, CE loss recovered, L0 (flattened to one level)."""
    config = EvalConfig(
        n_eval_reconstruction_batches=n_batches,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=n_batches,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    exclude = special_token_ids(model) or False
    metrics, _ = run_evals(sae, store, model, ActivationScaler(), config, exclude_special_tokens=exclude)
    flat = {}
    for group in metrics.values():
        if isinstance(group, dict):
            flat.update({key: value for key, value in group.items() if isinstance(value, (int, float))})
    return flat


def _layer_of(hook_name: str) -> int | None:
    parts = hook_name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def trained_k(sae: SAE[Any]) -> float | None:
    """The k an SAE was trained with (its own ``k``, or its training config's in the metadata); else None."""
    if getattr(sae.cfg, "k", None) is not None:
        return float(sae.cfg.k)  # type: ignore[attr-defined]
    details = sae.cfg.metadata.training_architecture_details or {}
    return float(details["k"]) if isinstance(details, dict) and details.get("k") is not None else None


@torch.no_grad()
def at_k(sae: SAE[Any], activations: torch.Tensor, k: float) -> SAE[Any]:
    """A copy of a JumpReLU ``sae`` that fires exactly ``int(k * N)`` pairs on ``activations [N, d_in]``.

    With one global threshold (Mutual Choice, BatchTopK) the copy gets the global threshold with
    that many scores above it; with per-latent thresholds (Feature Choice) each latent keeps its
    share of the pairs the SAE fires there (:func:`counts_at_k`).
    """
    return with_thresholds(sae, thresholds_for_counts(sae, activations, counts_at_k(sae, activations, k)))


@torch.no_grad()
def counts_at_k(sae: SAE[Any], activations: torch.Tensor, k: float) -> int | torch.Tensor:
    """What :func:`at_k` fires on ``activations [N, d_in]``: ``int(k * N)`` pairs for one global
    threshold, or per latent its share of the pairs ``sae`` fires there (capped at ``N``, the rest
    shared in proportion; largest-remainder rounding to that budget) for per-latent thresholds. ``-> int`` or ``[F]`` long."""
    threshold: torch.Tensor = sae.threshold  # type: ignore[assignment]
    n_tokens = activations.shape[0]
    budget = batch_budget(k, n_tokens)
    if bool((threshold == threshold[0]).all()):
        return budget
    x = sae.process_sae_in(activations.to(sae.W_enc.device, sae.W_enc.dtype))
    fired = torch.cat(
        [(latent_scores(sae, x, s) > threshold[s]).sum(0) for s in latent_blocks(n_tokens, sae.cfg.d_sae)]
    ).double()
    # In proportion to the firing, capped at the batch (an SAE firing fewer pairs than the budget
    # would otherwise ask some latents for more tokens than there are).
    shares = demand_capacities(fired, budget, n_tokens, min_capacity_ratio=0.0)
    return round_capacities(shares, torch.zeros_like(shares), budget, n_tokens)[0]


def with_thresholds(sae: SAE[Any], thresholds: torch.Tensor) -> SAE[Any]:
    """A copy of a JumpReLU ``sae`` with ``thresholds [F]``."""
    calibrated = copy.deepcopy(sae)
    calibrated.threshold.data = thresholds.to(sae.threshold)  # type: ignore[union-attr]
    return calibrated
