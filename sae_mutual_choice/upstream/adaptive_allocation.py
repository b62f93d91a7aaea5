"""Adaptive sparse allocation (Ayonrinde 2024, arXiv:2411.02124): the shared parts.

What the Mutual Choice and Feature Choice training SAEs share:

- the batch budget and the top-m selection that the allocation rules are built from;
- bias-corrected running averages, in which the running statistics are kept;
- Zipf fits over latent ranks, and the rounding of real-valued per-latent counts;
- ``aux_zipf``: TopK's AuxK generalised from dead latents to latents under-used
  relative to a Zipf law fitted to the firing rates;
- :class:`AdaptiveAllocationTrainingSAE`: a TopK training SAE that keeps each latent's
  running firing rate and offers the choice of auxiliary loss.

Ties at a selection boundary go to the lower index, so that a selection never depends
on the sorting kernel.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from typing_extensions import override

from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import (
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    act_times_W_dec,
)

AUX_LOSSES = ("aux_zipf", "aux_k", "none")
AuxLoss = Literal["aux_zipf", "aux_k", "none"]
AUX_COEFFICIENT = "aux_loss"


def batch_budget(k: float, n_tokens: int) -> int:
    """The number of (token, latent) pairs a batch of ``n_tokens`` tokens may fire.

    ``int(k * n_tokens)``: truncated as BatchTopK truncates it, so the two agree.
    """
    return int(k * n_tokens)


def top_m_mask(
    scores: torch.Tensor,
    m: torch.Tensor | int,
    dim: int,
    check_ties_on_host: bool = False,
) -> torch.Tensor:
    """Boolean mask of the ``m`` largest entries of ``scores`` along ``dim``.

    Args:
        scores: (n_rows, n_cols) scores.
        m: an int, or one count per slice (shape (scores.shape[1 - dim],)); each is
            clamped to ``scores.shape[dim]``. Ties at the boundary go to the lower
            index along ``dim``, so exactly ``m`` entries are selected.
        dim: the dimension to select along.
        check_ties_on_host: first read on the host whether any tie straddles a
            boundary, and skip the tie pass when none does (cheaper where a host read
            costs nothing, as on CPU).
    """
    n = scores.shape[dim]
    other = scores.shape[1 - dim]
    if isinstance(m, int):
        # Filled on the device, not copied from the host (a copy would sync on CUDA).
        m_max = min(max(m, 0), n) if other else 0
        counts = scores.new_full((), m_max, dtype=torch.long)
    else:
        counts = m.to(scores.device, torch.long).clamp(0, n)
        m_max = int(counts.max()) if counts.numel() else 0
    counts = counts.expand(other).unsqueeze(dim)
    if m_max == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if isinstance(m, int):
        # The m-th largest, from the shorter of two unsorted top-k's.
        if 2 * m_max > n:
            boundary = scores.topk(n - m_max + 1, dim=dim, largest=False, sorted=False)
            boundary = boundary.values.amax(dim, keepdim=True)
        else:
            boundary = scores.topk(m_max, dim=dim, sorted=False)
            boundary = boundary.values.amin(dim, keepdim=True)
    else:
        top_values = scores.topk(m_max, dim=dim, sorted=True).values
        boundary = top_values.gather(dim, (counts - 1).clamp(min=0))
    above = scores > boundary
    tied = scores == boundary
    still_needed = counts - above.sum(dim, keepdim=True)
    # Where a tie straddles the boundary, keep the first tied entries along dim.
    # Elsewhere this keeps every tied entry, so it is applied without asking unless
    # asking is cheap.
    if not check_ties_on_host or bool(
        (tied.sum(dim, keepdim=True) > still_needed).any()
    ):
        position = tied.cumsum(dim, dtype=torch.int32 if n < 2**31 else torch.int64)
        tied = tied & (position <= still_needed)
    return (above | tied) & (counts > 0)


def fire(scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Scores where selected and strictly positive, else 0.

    Gradient flows to the fired pairs only.
    """
    return torch.where(selected & (scores > 0), scores, scores.new_zeros(()))


def over_tokens(
    rule: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a rule on (batch_size, d_sae) scores to take scores (..., d_sae).

    Leading dimensions are flattened into one batch.
    """

    def apply(scores: torch.Tensor) -> torch.Tensor:
        return rule(scores.reshape(-1, scores.shape[-1])).reshape(scores.shape)

    return apply


def firing_statistics(
    feature_acts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent, how many pairs fired and the smallest fired activation.

    Args:
        feature_acts: (..., d_sae) activations.

    Returns:
        The counts (d_sae,) and the smallest fired activations (d_sae,), inf where
        none fired.
    """
    flat = feature_acts.detach().reshape(-1, feature_acts.shape[-1])
    fired = flat > 0
    return fired.sum(0), torch.where(fired, flat, torch.inf).amin(0)


@torch.no_grad()
def ema_update_(
    raw: torch.Tensor,
    weight: torch.Tensor,
    value: torch.Tensor,
    rate: float,
    where: torch.Tensor | None = None,
) -> None:
    """In place: ``raw <- (1 - rate) raw + rate value``, ``weight`` alike towards 1.

    An average that starts at 0 underestimates its target until about ``1 / rate``
    updates have been made. Its *weight*, the same average of the constant 1, corrects
    that: :func:`debiased` reads ``raw / weight``, as Adam corrects its moments. With
    ``where`` (a boolean tensor broadcastable to ``raw``), only those entries change.
    """
    new_raw = (1 - rate) * raw + rate * value.to(raw.dtype)
    new_weight = (1 - rate) * weight + rate
    if where is None:
        raw.copy_(new_raw)
        weight.copy_(new_weight)
    else:
        raw.copy_(torch.where(where, new_raw, raw))
        weight.copy_(torch.where(where, new_weight, weight))


def debiased(
    raw: torch.Tensor, weight: torch.Tensor, unset: float = 0.0
) -> torch.Tensor:
    """The bias-corrected average ``raw / weight``; ``unset`` where never updated."""
    tiny = torch.finfo(weight.dtype).tiny
    return torch.where(weight > 0, raw / weight.clamp(min=tiny), unset)


def ranks_of(statistic: torch.Tensor) -> torch.Tensor:
    """The 1-based rank of every latent by ``statistic``, largest first.

    Ties go to the lower latent index. (d_sae,) -> (d_sae,).
    """
    order = torch.sort(statistic, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, statistic.numel() + 1, device=statistic.device)
    return ranks


def fitted_zipf(
    statistic: torch.Tensor, fit_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``log s = log_scale - exponent * log rank`` to the head of a rank curve.

    The head is the ``ceil(fit_fraction * d_sae)`` highest ranks of ``statistic``;
    zero entries weigh nothing in the least-squares fit (their logarithm is
    undefined), so no host read decides which points count. The paper reports that
    latent densities follow a Zipf law except at the low-density end, so the law is
    fitted to the head and the tail is compared against it.

    Returns:
        ``(exponent, log_scale)``, float64 scalars on the device; ``(0, -inf)`` when
        fewer than two positive points are available.
    """
    values = torch.sort(statistic.detach().double().flatten(), descending=True).values
    head = values[: max(1, math.ceil(fit_fraction * values.numel()))]
    x = torch.arange(1, head.numel() + 1, dtype=torch.float64, device=head.device)
    x = x.log()
    positive = head > 0
    weight = positive.double()
    y = torch.where(positive, head, 1.0).log()
    n = weight.sum()
    x_mean = (weight * x).sum() / n.clamp(min=1)
    y_mean = (weight * y).sum() / n.clamp(min=1)
    x_centred = weight * (x - x_mean)
    spread = x_centred.pow(2).sum().clamp(min=torch.finfo(torch.float64).tiny)
    slope = (x_centred * (y - y_mean)).sum() / spread
    fitted = n >= 2
    exponent = torch.where(fitted, -slope, 0.0)
    return exponent, torch.where(fitted, y_mean - slope * x_mean, -math.inf)


def round_capacities(
    capacities: torch.Tensor, carry: torch.Tensor, budget: int, n_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer per-latent counts summing to ``budget``, the rounding error carried over.

    Largest-remainder rounding of ``capacities + carry``: every latent gets the floor
    (within ``[0, n_tokens]``), and the latents under the cap with the largest
    remainders (ties to the lower index) get one more until the budget is met; should
    that not reach it (a latent at the cap holding a positive carry), the rest fills
    the others' room in the same order. A latent whose capacity is below one token is
    so served in a fraction of the batches, rotating, and receives its real capacity
    on average.

    Args:
        capacities: (d_sae,) real-valued targets summing to ``budget``.
        carry: (d_sae,) float64 rounding error of the last batch (sums to 0).
        budget: the total.
        n_tokens: the cap of every latent.

    Returns:
        The integer counts (d_sae,) long and the new carry (d_sae,) float64.
    """
    target = capacities.double() + carry.double()
    rounded = target.floor().clamp(0, n_tokens)
    remainder = target - rounded
    # A device value: both corrections are computed and at most one applies.
    shortfall = budget - rounded.sum()
    # More for the largest remainders among latents under the cap...
    up = _spread(shortfall.clamp(min=0), n_tokens - rounded, remainder, True)
    # ...or less for the smallest among latents above 0 (float drift of the carry).
    down = _spread((-shortfall).clamp(min=0), rounded, remainder, False)
    rounded = rounded + up - down
    return rounded.long(), target - rounded


def _spread(
    units: torch.Tensor,
    room: torch.Tensor,
    priority: torch.Tensor,
    descending: bool,
) -> torch.Tensor:
    """``units`` (at most ``room.sum()``) spread over latents with ``room``.

    One each, in priority order (ties to the lower index), to up to ``units`` latents
    with room; what is left fills the remaining room in the same order. (d_sae,).
    """
    has_room = room > 0
    blocked = -math.inf if descending else math.inf
    order = _rank(torch.where(has_room, priority, blocked), descending=descending)
    first = (has_room & (order < units)).double()
    left = units - first.sum()
    room_left = room - first
    # room_left in priority order, and the room ahead of each latent in that order.
    by_order = torch.empty_like(room_left).scatter_(0, order, room_left)
    before = (by_order.cumsum(0) - by_order)[order]
    return first + (left - before).clamp(min=0).minimum(room_left)


def _rank(values: torch.Tensor, descending: bool) -> torch.Tensor:
    """The 0-based position of every entry in a stable sort of ``values``."""
    order = torch.sort(values, descending=descending, stable=True).indices
    positions = torch.arange(order.numel(), device=order.device)
    return torch.empty_like(order).scatter_(0, order, positions)


@torch.no_grad()
def underuse_weights(
    usage: torch.Tensor, fit_fraction: float, underuse_ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every latent's under-use weight relative to a Zipf law fitted to ``usage``.

    A Zipf law fitted to the head of the rank curve (:func:`fitted_zipf`) gives every
    rank ``r`` a target rate ``t_r``; the latent at rank ``r`` gets the weight
    ``clamp(1 - usage / (underuse_ratio * t_r), 0, 1)``: 0 once it fires at least
    ``underuse_ratio`` of its target, 1 when it never fires; all 0 when no law can be
    fitted (fewer than two latents fire).

    Args:
        usage: (d_sae,) each latent's firing rate.
        fit_fraction: share of the rank curve, from the top, the law is fitted to.
        underuse_ratio: share of its target below which a latent is under-used.

    Returns:
        The weights (d_sae,) and the fitted exponent (a float64 scalar tensor).
    """
    exponent, log_scale = fitted_zipf(usage, fit_fraction)
    ranks = ranks_of(usage).to(torch.float64)
    target = torch.exp(log_scale - exponent * ranks.log())
    weights = (1 - usage.double() / (underuse_ratio * target)).clamp(0, 1)
    weights = torch.where(torch.isfinite(log_scale), weights, 0.0)
    return weights.to(usage.dtype), exponent


class AuxSelection(NamedTuple):
    """The latents each token's aux reconstruction uses.

    Args:
        latents: (batch_size, k_aux) latent ids.
        weights: (batch_size, k_aux) their under-use weights; 0 for selected latents
            that are not candidates.
        scale: the loss scale ``min(sum of weights / k_aux, 1)``.
    """

    latents: torch.Tensor
    weights: torch.Tensor
    scale: float | torch.Tensor


def search_masked(
    hidden_pre: torch.Tensor, candidates: torch.Tensor, k: int
) -> torch.Tensor:
    """Each token's ``k`` best latents, non-candidates scored -inf (no host read).

    Non-candidates fill the rest when there are fewer than ``k`` candidates.
    """
    masked = torch.where(candidates, hidden_pre, -torch.inf)
    return masked.topk(k, sorted=False).indices


@torch.no_grad()
def aux_selection(
    hidden_pre: torch.Tensor, underuse: torch.Tensor, d_in: int
) -> AuxSelection | None:
    """Which latents each token's aux reconstruction uses, with no host read.

    Each token takes its ``k_aux = d_in // 2`` best-scoring candidates (latents with
    weight > 0), all of them if there are fewer: a selection of fixed size
    ``min(k_aux, d_sae)`` per token (:func:`search_masked`), non-candidates filling it
    at weight 0, which adds nothing to the loss or its gradients.

    Args:
        hidden_pre: (..., d_sae) scores.
        underuse: (d_sae,) weights in [0, 1].
        d_in: the input dimension.

    Returns:
        The selection, or None when ``k_aux`` is 0 (AuxK would divide by it).
    """
    k_aux = d_in // 2
    if k_aux == 0:
        return None
    latents = search_masked(hidden_pre, underuse > 0, min(k_aux, hidden_pre.shape[-1]))
    scale = (underuse.sum() / k_aux).clamp(max=1.0)
    return AuxSelection(latents, underuse.to(hidden_pre.dtype)[latents], scale)


AuxSelector = Callable[[torch.Tensor, torch.Tensor, int], AuxSelection | None]


def aux_zipf_loss(
    sae_in: torch.Tensor,
    sae_out: torch.Tensor,
    hidden_pre: torch.Tensor,
    underuse: torch.Tensor,
    W_dec: torch.Tensor,
    rescale_acts_by_decoder_norm: bool,
    coefficient: float,
    select: AuxSelector = aux_selection,
) -> torch.Tensor:
    """The auxiliary loss of one batch: AuxK with under-use weights.

    AuxK lets each token's ``k_aux = d_in // 2`` highest-scoring *dead* latents
    reconstruct the detached residual ``x - x_hat`` (no ``b_dec``), scaled by
    ``min(n_dead / k_aux, 1)``. Here every latent has an under-use weight ``w`` in
    [0, 1]: the candidates are the latents with ``w > 0``, each selected latent's
    activation is multiplied by its ``w``, and the scale is ``min(sum(w) / k_aux, 1)``.
    With ``w`` the dead mask this is AuxK.

    Args:
        sae_in: (batch_size, d_in) inputs.
        sae_out: (batch_size, d_in) reconstructions.
        hidden_pre: (batch_size, d_sae) scores.
        underuse: (d_sae,) weights in [0, 1].
        W_dec: (d_sae, d_in) decoder.
        rescale_acts_by_decoder_norm: whether scores carry the decoder norms.
        coefficient: the loss coefficient.
        select: how the latents are chosen (:func:`aux_selection`, or an equivalent).
    """
    selection = select(hidden_pre, underuse, sae_in.shape[-1])
    if selection is None:
        return sae_out.new_tensor(0.0)
    values = hidden_pre.gather(-1, selection.latents) * selection.weights
    aux_acts = torch.zeros_like(hidden_pre).scatter(-1, selection.latents, values)
    recons = act_times_W_dec(aux_acts, W_dec, rescale_acts_by_decoder_norm)
    return aux_reconstruction_loss(
        recons, sae_in, sae_out, selection.scale, coefficient
    )


def aux_reconstruction_loss(
    recons: torch.Tensor,
    sae_in: torch.Tensor,
    sae_out: torch.Tensor,
    scale: float | torch.Tensor,
    coefficient: float,
) -> torch.Tensor:
    """``coefficient * scale * |recons - (sae_in - sae_out)|^2``, mean over tokens.

    The residual ``sae_in - sae_out`` is detached.
    """
    residual = (sae_in - sae_out).detach()
    return coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()


NONFINITE_MESSAGE = "activations contain NaN or infinite values"


def validate_activations(x: torch.Tensor, d_in: int, finite: bool = True) -> None:
    """Raise ``ValueError`` for activations an SAE with ``d_in`` inputs cannot encode.

    The last dimension must be ``d_in`` and there must be a token; with ``finite``,
    NaN or infinite values are refused too (a host read).
    """
    if x.ndim == 0 or x.shape[-1] != d_in:
        raise ValueError(
            f"activations must have last dimension d_in={d_in}, got shape {list(x.shape)}"
        )
    if x.shape[:-1].numel() == 0:
        raise ValueError(
            f"activations must hold at least one token, got shape {list(x.shape)}"
        )
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(NONFINITE_MESSAGE)


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number in ``low .. high``."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
    if ok:
        ok = value > low if low_open else value >= low
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        opening, closing = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(
            f"{name} must be a finite number in {opening}{low}, {high}{closing}, "
            f"got {value!r}"
        )


def check_integer(name: str, value: Any, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer ``>= low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


@dataclass
class AdaptiveAllocationTrainingSAEConfig(TopKTrainingSAEConfig):
    """TopK's training config plus the running statistics and the aux loss choice.

    Args:
        aux_loss (str): ``"aux_zipf"`` (latents under-used relative to a Zipf law
            fitted to the firing rates, dead latents included), ``"aux_k"`` (dead
            latents only: TopK's AuxK) or ``"none"``. Its coefficient is
            ``aux_loss_coefficient``.
        aux_loss_warm_up_steps (int): steps over which the aux coefficient ramps
            linearly from 0.
        usage_window (int): time constant, in training steps, of the running
            statistics (bias-corrected moving averages); 1000 matches the default
            ``dead_feature_window``.
        zipf_fit_fraction (float): share of the rank curve, from the top, that the
            Zipf law is fitted to, in (0, 1].
        underuse_ratio (float): a latent is under-used while it fires less than this
            share, in (0, 1], of its Zipf target rate; its aux weight grows from 0
            there to 1 at no firing.
    """

    aux_loss: AuxLoss = "aux_k"
    aux_loss_warm_up_steps: int = 0
    usage_window: int = 1000
    zipf_fit_fraction: float = 0.5
    underuse_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("d_in", self.d_in, 1, math.inf)
        check_range("d_sae", self.d_sae, 1, math.inf)
        check_range("k", self.k, 0, self.d_sae, low_open=True)
        check_choice("aux_loss", self.aux_loss, AUX_LOSSES)
        check_range("aux_loss_coefficient", self.aux_loss_coefficient, 0, math.inf)
        check_integer("aux_loss_warm_up_steps", self.aux_loss_warm_up_steps, 0)
        check_integer("usage_window", self.usage_window, 1)
        check_range("zipf_fit_fraction", self.zipf_fit_fraction, 0, 1, low_open=True)
        check_range("underuse_ratio", self.underuse_ratio, 0, 1, low_open=True)
        if self.use_sparse_activations:
            raise ValueError(
                f"use_sparse_activations must be False for {self.architecture()}: "
                "its allocation rules select from dense scores"
            )
        if self.aux_loss != "none" and self.normalize_activations in (
            "constant_norm_rescale",
            "layer_norm",
        ):
            raise ValueError(
                f"aux_loss={self.aux_loss!r} does not support normalize_activations="
                f"{self.normalize_activations!r} (the aux reconstruction would live in "
                "normalised space while the residual does not); set aux_loss='none' "
                "or another normalisation"
            )


class AdaptiveAllocationTrainingSAE(TopKTrainingSAE):
    """A TopK training SAE with running firing rates and a choice of aux loss.

    Subclasses provide ``get_activation_fn`` (their allocation rule). Running
    statistics are persistent buffers, so checkpoints keep them; they change only
    inside :meth:`training_forward_pass`, and the inference export drops them.
    """

    cfg: AdaptiveAllocationTrainingSAEConfig  # type: ignore[assignment]
    latent_usage: torch.Tensor
    latent_usage_weight: torch.Tensor

    def __init__(
        self, cfg: AdaptiveAllocationTrainingSAEConfig, use_error_term: bool = False
    ):
        super().__init__(cfg, use_error_term)
        self.training_only_buffers: list[str] = []
        self.register_training_buffer("latent_usage", torch.zeros(cfg.d_sae))
        self.register_training_buffer("latent_usage_weight", torch.zeros(()))
        # Logged through TrainStepOutput.metrics (tensors are read at logging steps).
        self.step_metrics: dict[str, float | torch.Tensor] = {}
        # Inside training_forward_pass, where the running statistics may change.
        self.in_training_step = False

    def register_training_buffer(self, name: str, value: torch.Tensor) -> None:
        """A persistent buffer that checkpoints keep and the inference export drops."""
        self.register_buffer(name, value.to(self.W_dec.device))
        self.training_only_buffers.append(name)

    @property
    def statistics_rate(self) -> float:
        """The rate of the running statistics: ``1 / usage_window``."""
        return 1.0 / self.cfg.usage_window

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        if self.cfg.aux_loss == "none":
            return {}
        return {
            AUX_COEFFICIENT: TrainCoefficientConfig(
                value=self.cfg.aux_loss_coefficient,
                warm_up_steps=self.cfg.aux_loss_warm_up_steps,
            )
        }

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self.in_training_step = True
        try:
            output = self.training_step(step_input)
            with torch.no_grad():
                counts, smallest = self.firing_statistics(output.feature_acts)
                n_tokens = output.sae_in.reshape(-1, self.cfg.d_in).shape[0]
                self.update_running_statistics(counts, smallest, n_tokens)
                self.record_training_inputs(step_input.sae_in)
        finally:
            self.in_training_step = False
        output.metrics.update(self.step_metrics)
        return output

    def training_step(self, step_input: TrainStepInput) -> TrainStepOutput:
        """The training step itself: TopK's dense step with this SAE's activation."""
        return super().training_forward_pass(step_input)

    def firing_statistics(
        self, feature_acts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per latent, the pairs fired and the smallest fired activation, (d_sae,) each."""
        return firing_statistics(feature_acts)

    @torch.no_grad()
    def update_running_statistics(
        self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int
    ) -> None:
        """Update the running statistics from a training step's firing.

        Args:
            counts: (d_sae,) each latent's number of fired pairs.
            smallest: (d_sae,) each latent's smallest fired activation (inf: none).
            n_tokens: the batch's number of tokens.
        """
        fired = counts.float() / n_tokens
        rate = self.statistics_rate
        ema_update_(self.latent_usage, self.latent_usage_weight, fired, rate)

    def record_training_inputs(self, sae_in: torch.Tensor) -> None:
        """Called with each training step's inputs, after the step."""

    def underuse(self, dead_neuron_mask: torch.Tensor | None) -> torch.Tensor:
        """Each latent's aux weight in [0, 1] for the configured ``aux_loss``, (d_sae,)."""
        dead = torch.zeros(self.cfg.d_sae, device=self.W_dec.device)
        if dead_neuron_mask is not None:
            dead = dead_neuron_mask.to(self.W_dec.device, torch.float32)
        if self.cfg.aux_loss != "aux_zipf":
            return dead
        weights, exponent = underuse_weights(
            debiased(self.latent_usage, self.latent_usage_weight),
            self.cfg.zipf_fit_fraction,
            self.cfg.underuse_ratio,
        )
        self.step_metrics["usage_zipf_exponent"] = exponent
        # Under-use is judged with the evidence at hand: the estimate's weight scales
        # the weights, so a latent that missed the first batches is not taken for dead
        # (and before any step, with weight 0, only the dead mask counts).
        evidence = self.latent_usage_weight.float()
        return torch.maximum(weights.float() * evidence, dead)

    def aux_underuse(
        self, step_input: TrainStepInput
    ) -> tuple[torch.Tensor, float] | None:
        """The aux weights (d_sae,) and coefficient now; None without an aux loss."""
        if self.cfg.aux_loss == "none":
            return None
        underuse = self.underuse(step_input.dead_neuron_mask)
        self.step_metrics["underused_latents"] = (underuse > 0).sum()
        coefficient = step_input.coefficients.get(AUX_COEFFICIENT)
        if coefficient is None:
            coefficient = self.cfg.aux_loss_coefficient
        return underuse, coefficient

    def aux_selection(
        self, hidden_pre: torch.Tensor, underuse: torch.Tensor, d_in: int
    ) -> AuxSelection | None:
        """The latents each token's aux reconstruction uses (:func:`aux_selection`)."""
        return aux_selection(hidden_pre, underuse, d_in)

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        aux = self.aux_underuse(step_input)
        if aux is None:
            return {}
        underuse, coefficient = aux
        loss = aux_zipf_loss(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            hidden_pre=hidden_pre,
            underuse=underuse,
            W_dec=self.W_dec,
            rescale_acts_by_decoder_norm=self.cfg.rescale_acts_by_decoder_norm,
            coefficient=coefficient,
            select=self.aux_selection,
        )
        return {"auxiliary_reconstruction_loss": loss}

    @override
    def process_state_dict_for_saving_inference(
        self, state_dict: dict[str, Any]
    ) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        for name in self.training_only_buffers:
            state_dict.pop(name, None)
