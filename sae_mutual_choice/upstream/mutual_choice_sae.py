"""Mutual Choice SAEs (Ayonrinde 2024, arXiv:2411.02124), saved as JumpReLU SAEs.

A batch of B tokens fires its ``int(k * B)`` largest (token, latent) scores, as
BatchTopK does, ties going to the lower ``token * d_sae + latent``. At inference the
batch is gone, so the SAE is exported as a JumpReLU SAE whose threshold comes from,
first match wins:

1. an explicit :func:`calibrate_thresholds` on activations the user supplies (until
   training moves on); a checkpoint keeps the thresholds it would export;
2. a uniform random sample of the training inputs (reservoir sampling, of
   :meth:`MutualChoiceTrainingSAE.calibration_sample_size` inputs), calibrated with the
   final weights when the inference model is saved: exact on the sample, for counts
   corrected for the sample's mean input norm;
3. the bias-corrected running average of each batch's smallest fired score.

The sample is uniform over the whole run, not the latest inputs: a corpus read in order
makes the latest inputs a few documents whose thresholds do not carry over to other
text. It is held in memory only, from the first training step on, and by default takes at
most half as many bytes as the SAE's parameters (or 64 MiB, for small SAEs).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_mutual_choice.upstream.adaptive_allocation import (
    AdaptiveAllocationTrainingSAE,
    AdaptiveAllocationTrainingSAEConfig,
    batch_budget,
    check_integer,
    check_range,
    debiased,
    ema_update_,
    fire,
    over_tokens,
    round_capacities,
    top_m_mask,
    validate_activations,
)

# The default calibration sample: at most this many inputs, taking at most half the SAE's
# parameter bytes or CALIBRATION_BYTES_FLOOR, whichever is more (small SAEs keep a large sample).
MAX_CALIBRATION_TOKENS = 65536
CALIBRATION_BYTES_FLOOR = 64 << 20
# Calibration computes scores a block of latents at a time, up to this many bytes.
MAX_BLOCK_BYTES = 1 << 28
# A sample whose norms spread less than this many units of the inputs' float resolution
# has nearly constant norms (a LayerNorm'd hook point): their differences are rounding,
# and a slope fitted to them would turn rounding into a correction.
NORM_RESOLUTION_UNITS = 4


def mutual_choice_mask(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Boolean (batch_size, d_sae) mask of the ``budget`` largest scores of a batch."""
    flat = scores.reshape(-1, 1)
    return top_m_mask(flat, budget, dim=0).reshape(scores.shape)


def mutual_choice(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Mutual Choice: the ``budget`` largest (token, latent) scores of a batch fire.

    Only positive scores fire. (batch_size, d_sae) -> (batch_size, d_sae).
    """
    return fire(scores, mutual_choice_mask(scores, budget))


@dataclass
class MutualChoiceTrainingSAEConfig(AdaptiveAllocationTrainingSAEConfig):
    """Configuration for training a MutualChoiceTrainingSAE, saved as a JumpReLU SAE.

    Args:
        k (float): mean number of latents per token: a batch of B tokens fires at most
            ``int(k * B)`` (token, latent) pairs.
        topk_threshold_lr (float): rate, in (0, 1], of the running threshold average.
            0.1 rather than BatchTopK's 0.01: the per-batch boundary is an order
            statistic of many pairs (little noise), and a slow average trails the
            threshold as it rises during training.
        threshold_calibration_tokens (int | None): size of the uniform sample of
            training inputs kept to calibrate the exported threshold (0: export the
            running average instead). The exported L0's sampling noise falls as its
            square root. None: the most inputs, up to 65,536, whose copies take at most
            half as many bytes as the SAE's parameters, or 64 MiB if that is more.
        aux_loss (str): see AdaptiveAllocationTrainingSAEConfig; defaults to
            ``"aux_k"``.
    """

    k: float = 100  # type: ignore[assignment]
    topk_threshold_lr: float = 0.1
    threshold_calibration_tokens: int | None = None

    @override
    @classmethod
    def architecture(cls) -> str:
        return "mutual_choice"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUSAEConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("topk_threshold_lr", self.topk_threshold_lr, 0, 1, low_open=True)
        if self.threshold_calibration_tokens is not None:
            check_integer(
                "threshold_calibration_tokens", self.threshold_calibration_tokens, 0
            )


class MutualChoiceTrainingSAE(AdaptiveAllocationTrainingSAE):
    """Mutual Choice training SAE; saved as a JumpReLU SAE (see the module docstring).

    ``topk_threshold`` is the running threshold average (raw; its weight is
    ``topk_threshold_weight``), ``calibrated_thresholds`` the thresholds pinned by a
    calibration (NaN: none).
    """

    cfg: MutualChoiceTrainingSAEConfig  # type: ignore[assignment]
    topk_threshold: torch.Tensor
    topk_threshold_weight: torch.Tensor
    calibrated_thresholds: torch.Tensor
    calibration_inputs: torch.Tensor
    calibration_norms: torch.Tensor
    calibration_keys: torch.Tensor
    input_norm_totals: torch.Tensor

    def __init__(
        self, cfg: MutualChoiceTrainingSAEConfig, use_error_term: bool = False
    ):
        super().__init__(cfg, use_error_term)
        shape = self.threshold_shape()
        double = torch.double
        self.register_training_buffer(
            "topk_threshold", torch.zeros(shape, dtype=double)
        )
        self.register_training_buffer(
            "topk_threshold_weight", torch.zeros(shape, dtype=double)
        )
        self.register_training_buffer(
            "calibrated_thresholds", torch.full((cfg.d_sae,), torch.nan, dtype=double)
        )
        self._reset_calibration_sample()

    def threshold_shape(self) -> tuple[int, ...]:
        """The running threshold's shape: one global value."""
        return ()

    @override
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        # A bound method (not a closure), so that deepcopy rebinds it to the copy.
        return self.activate

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        """Mutual Choice on scores (..., d_sae), leading dimensions one batch."""
        k = self.cfg.k
        return over_tokens(lambda s: mutual_choice(s, batch_budget(k, s.shape[0])))(
            scores
        )

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        output.metrics["topk_threshold"] = debiased(
            self.topk_threshold, self.topk_threshold_weight
        )
        return output

    @override
    @torch.no_grad()
    def update_running_statistics(
        self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int
    ) -> None:
        super().update_running_statistics(counts, smallest, n_tokens)
        smallest = self.threshold_statistic(smallest.to(self.topk_threshold.dtype))
        fired = torch.isfinite(smallest)
        ema_update_(
            self.topk_threshold,
            self.topk_threshold_weight,
            torch.where(fired, smallest, 0.0),
            self.cfg.topk_threshold_lr,
            where=fired,
        )

    def threshold_statistic(self, smallest: torch.Tensor) -> torch.Tensor:
        """The batch's boundary from each latent's smallest fired score: their minimum."""
        return smallest.min()

    def ema_thresholds(self) -> torch.Tensor:
        """The running threshold for every latent, (d_sae,); inf where never set."""
        value = debiased(self.topk_threshold, self.topk_threshold_weight, torch.inf)
        return torch.ones_like(self.b_enc) * value.to(self.b_enc.dtype)

    def calibration_counts(self, n_tokens: int) -> int | torch.Tensor:
        """How many pairs of ``n_tokens`` tokens fire at inference: the budget."""
        return batch_budget(self.cfg.k, n_tokens)

    def _reset_calibration_sample(self, n: int = 0) -> None:
        """An empty sample of ``n`` slots (buffers left out of checkpoints).

        Built and loaded SAEs hold 0 slots; the first training step allocates
        :meth:`calibration_sample_size`.
        """
        device = self.W_dec.device
        inputs = torch.zeros(n, self.cfg.d_in, dtype=self.W_dec.dtype, device=device)
        self.register_buffer("calibration_inputs", inputs, persistent=False)
        # Each sampled input's norm as training saw it (folds change the inputs).
        # Float64, as the totals: with nearly constant norms float32 rounding of the
        # sum moves the run's mean by more than the sample's whole spread.
        norms = torch.zeros(n, dtype=torch.double, device=device)
        self.register_buffer("calibration_norms", norms, persistent=False)
        keys = torch.full((n,), -torch.inf, device=device)  # -inf: an empty slot
        self.register_buffer("calibration_keys", keys, persistent=False)
        # Every input seen since: (sum of norms, count).
        totals = torch.zeros(2, dtype=torch.double, device=device)
        self.register_buffer("input_norm_totals", totals, persistent=False)
        self._sampling_generator: torch.Generator | None = None

    def calibration_sample_size(self) -> int:
        """How many inputs the calibration sample holds.

        ``threshold_calibration_tokens``, or by default the most inputs, up to
        ``MAX_CALIBRATION_TOKENS``, whose copies (with their norms and keys) take at most
        half as many bytes as the SAE's parameters or ``CALIBRATION_BYTES_FLOOR``,
        whichever is more.
        """
        if self.cfg.threshold_calibration_tokens is not None:
            return self.cfg.threshold_calibration_tokens
        parameter_bytes = sum(p.numel() * p.element_size() for p in self.parameters())
        allowed = max(parameter_bytes // 2, CALIBRATION_BYTES_FLOOR)
        row_bytes = self.cfg.d_in * self.W_dec.element_size() + 8 + 4
        return min(MAX_CALIBRATION_TOKENS, allowed // row_bytes)

    def allocate_calibration_sample(self) -> None:
        """Give the sample its :meth:`calibration_sample_size` slots, once."""
        n = self.calibration_sample_size()
        if self.calibration_keys.shape[0] != n:
            self._reset_calibration_sample(n)

    @override
    def load_state_dict(
        self, state_dict: Any, strict: bool = True, assign: bool = False
    ) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._reset_calibration_sample()  # a loaded SAE samples afresh
        return result

    @override
    def record_training_inputs(self, sae_in: torch.Tensor) -> None:
        self.remember_inputs(sae_in)

    @torch.no_grad()
    def remember_inputs(self, sae_in: torch.Tensor) -> None:
        """Add a batch to the uniform sample of inputs; drop any explicit calibration.

        Reservoir sampling by random keys: every input gets a uniform key, and the
        sample is the :meth:`calibration_sample_size` inputs with the largest keys
        seen so far; no host synchronisation. Each input's norm is kept with it, and
        the norms of all inputs are summed, for the export's correction.
        """
        self.calibrated_thresholds.fill_(torch.nan)
        capacity = self.calibration_sample_size()
        if capacity == 0:
            return
        self.allocate_calibration_sample()
        rows = sae_in.detach().reshape(-1, self.cfg.d_in)
        # Each norm in float32 at least, summed in float64 (a float32 sum would move
        # the run's mean by more than the spread of nearly constant norms).
        norm_dtype = torch.promote_types(rows.dtype, torch.float32)
        norms = torch.linalg.vector_norm(rows, dim=-1, dtype=norm_dtype)
        self.input_norm_totals[0] += norms.sum(dtype=torch.float64)
        self.input_norm_totals[1] += rows.shape[0]
        keys = self.sample_keys(rows.shape[0]).to(self.calibration_keys)
        kept = torch.cat([self.calibration_keys, keys]).topk(capacity).indices
        n_slots = capacity + rows.shape[0]
        chosen = torch.zeros(n_slots, dtype=torch.bool, device=kept.device)
        chosen[kept] = True
        # Pair the evicted slots with the chosen new rows: both come first in their
        # orderings, and the first n_new pairs are written; the rest rewrite what is
        # there.
        n_pairs = min(capacity, rows.shape[0])
        slots = torch.sort(chosen[:capacity].to(torch.int8), stable=True).indices
        slots = slots[:n_pairs]
        new = torch.sort(
            chosen[capacity:].to(torch.int8), descending=True, stable=True
        ).indices[:n_pairs]
        write = torch.arange(n_pairs, device=kept.device) < chosen[capacity:].sum()
        self.calibration_inputs[slots] = torch.where(
            write[:, None],
            rows[new].to(self.calibration_inputs),
            self.calibration_inputs[slots],
        )
        self.calibration_norms[slots] = torch.where(
            write, norms[new], self.calibration_norms[slots]
        )
        self.calibration_keys[slots] = torch.where(
            write, keys[new], self.calibration_keys[slots]
        )

    def sample_keys(self, n_rows: int) -> torch.Tensor:
        """Uniform reservoir keys for a batch of ``n_rows`` inputs, (n_rows,)."""
        device = self.calibration_keys.device
        generator = self._sampling_generator
        if generator is None or generator.device != device:
            # Its own stream: the global one stays the user's.
            generator = torch.Generator(device=device).manual_seed(0)
            self._sampling_generator = generator
        return torch.rand(n_rows, generator=generator, device=device)

    def calibration_sample(self) -> torch.Tensor:
        """The sampled training inputs (n, d_in), by key, largest first."""
        return sample_by_key(self.calibration_keys, self.calibration_inputs)

    def set_inference_thresholds(self, thresholds: torch.Tensor) -> None:
        """Pin the exported thresholds, (d_sae,), until the next training step."""
        with torch.no_grad():
            self.calibrated_thresholds.copy_(thresholds)

    def inference_thresholds(self) -> torch.Tensor:
        """The thresholds the JumpReLU export uses now, (d_sae,).

        Raises ``ValueError`` when there is none to export (no training step and no
        calibration).
        """
        if not bool(self.calibrated_thresholds.isnan().any()):
            thresholds = self.calibrated_thresholds
        elif bool(torch.isfinite(self.calibration_keys).any()):
            norms = sample_by_key(self.calibration_keys, self.calibration_norms)
            thresholds = sample_thresholds(
                self, self.calibration_sample(), norms, self.input_norm_totals
            )
        else:
            thresholds = self.ema_thresholds()
        if not bool(torch.isfinite(thresholds).any()):
            raise ValueError(
                f"{self.cfg.architecture()} SAE has no threshold to export: it has "
                "taken no training step and has no calibration. Train it, call "
                "calibrate_thresholds(sae, activations), or pin thresholds with "
                "set_inference_thresholds (a running estimate is read as raw / "
                "weight, e.g. topk_threshold / topk_threshold_weight: setting the "
                "raw value alone leaves it unset)"
            )
        return thresholds.to(self.b_enc.dtype)

    @override
    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        # The sampled inputs were scaled by the factor; the folded SAE takes unscaled.
        self.calibration_inputs /= scaling_factor
        if self.cfg.rescale_acts_by_decoder_norm:
            # Scores carry the decoder norms, which the fold divided by the factor.
            self.topk_threshold /= scaling_factor
            self.calibrated_thresholds /= scaling_factor

    @override
    @torch.no_grad()
    def fold_activation_whitening(
        self,
        mean: torch.Tensor,
        whitening_matrix: torch.Tensor,
        unwhitening_matrix: torch.Tensor,
    ) -> None:
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)
        # Scores are unchanged by the fold; the sampled (whitened) inputs go back to
        # raw activations.
        inputs = self.calibration_inputs
        raw = inputs.double() @ unwhitening_matrix.double().to(inputs.device)
        inputs.copy_(raw + mean.double().to(raw.device))

    @override
    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving(state_dict)
        # A checkpoint keeps what its export needs, not the sampled activations.
        sampled = bool(torch.isfinite(self.calibration_keys).any())
        if sampled or not bool(self.calibrated_thresholds.isnan().any()):
            state_dict["calibrated_thresholds"] = self.inference_thresholds().double()

    @override
    def process_state_dict_for_saving_inference(
        self, state_dict: dict[str, Any]
    ) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        state_dict["threshold"] = self.inference_thresholds()


def sample_by_key(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The values (inputs (n, d_in) or norms (n,)) with a finite key, by key.

    Largest key first, ties in slot order.
    """
    order = keys.argsort(descending=True, stable=True)
    return values[order][torch.isfinite(keys[order])]


@torch.no_grad()
def sample_thresholds(
    sae: MutualChoiceTrainingSAE,
    sample: torch.Tensor,
    norms: torch.Tensor,
    norm_totals: torch.Tensor,
) -> torch.Tensor:
    """Thresholds from a uniform sample of the run's inputs, with corrected counts.

    The counts are the SAE's own for the sample's size, corrected for the sample's
    mean norm (:func:`norm_corrected_counts`): a large-norm input fires many latents,
    so how many such inputs a sample happens to draw would move the thresholds. When
    the sample is every input the run saw, the counts stay exact.

    Args:
        sae: the SAE.
        sample: (n, d_in) inputs drawn from the run's inputs.
        norms: (n,) their norms.
        norm_totals: (2,) the sum of the norms of the run's inputs, and their count.

    Returns:
        (d_sae,) float64 thresholds.
    """
    n_tokens = sample.shape[0]
    norm_sum, n_seen = norm_totals.tolist()
    counts = sae.calibration_counts(n_tokens)
    if n_seen <= n_tokens:
        return thresholds_for_counts(sae, sample, counts)
    return norm_corrected_thresholds(sae, sample, counts, norms, norm_sum / n_seen)


def calibrate_thresholds(sae: Any, activations: torch.Tensor) -> torch.Tensor:
    """Set ``sae``'s exported thresholds exactly from ``activations``; return them.

    The next ``save_inference_model`` (or the runner's final save) exports these
    thresholds; on these activations the exported JumpReLU SAE then has mean L0
    ``int(k * N) / N`` (Mutual Choice), or fires each latent on exactly its
    capacity's worth of tokens (Feature Choice). A training step drops them.

    Args:
        sae: a trained Mutual or Feature Choice training SAE.
        activations: (..., d_in) raw activations from the training distribution,
            preferably held out.

    Returns:
        The thresholds, (d_sae,).
    """
    if not isinstance(sae, MutualChoiceTrainingSAE):
        raise TypeError(
            "calibrate_thresholds takes a mutual_choice or feature_choice training "
            f"SAE, got {type(sae).__name__}"
        )
    validate_activations(activations, sae.cfg.d_in)
    n_tokens = activations.reshape(-1, sae.cfg.d_in).shape[0]
    counts = sae.calibration_counts(n_tokens)
    sae.set_inference_thresholds(thresholds_for_counts(sae, activations, counts))
    return sae.inference_thresholds()


def latent_scores(sae: Any, sae_in: torch.Tensor, latents: slice) -> torch.Tensor:
    """The training scores (``hidden_pre``) of a block of latents.

    Equals ``sae.encode_with_hidden_pre(x)[1][:, latents]``, decoder-norm rescaling
    included. (n, d_in) processed inputs -> (n, len(latents)).
    """
    scores = sae_in @ sae.W_enc[:, latents] + sae.b_enc[latents]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        scores = scores * sae.W_dec[latents].norm(dim=-1)
    return scores


def latent_blocks(
    n_tokens: int, n_latents: int, max_block_bytes: int = MAX_BLOCK_BYTES
) -> list[slice]:
    """Blocks of latents whose float32 scores over ``n_tokens`` fit the byte limit."""
    block = max(1, min(n_latents, max_block_bytes // (4 * n_tokens)))
    return [
        slice(start, min(start + block, n_latents))
        for start in range(0, n_latents, block)
    ]


@torch.no_grad()
def thresholds_for_counts(
    sae: Any,
    activations: torch.Tensor,
    counts: int | torch.Tensor,
    max_block_bytes: int = MAX_BLOCK_BYTES,
) -> torch.Tensor:
    """Thresholds under which ``sae`` fires exactly ``counts`` of its scores.

    Order statistics, computed a block of latents at a time, so memory is bounded by
    the number of tokens times the block. Never below 0.

    Args:
        sae: any SAE with ``W_enc``, ``b_enc`` and ``process_sae_in`` (a training
            SAE, or an exported JumpReLU SAE).
        activations: (..., d_in) raw activations.
        counts: an int (one global threshold with that many (token, latent) pairs
            above it) or (d_sae,) counts (per latent, that many tokens above it).
        max_block_bytes: the largest block of scores computed at once.

    Returns:
        (d_sae,) float64 thresholds.
    """
    x = activations.reshape(-1, sae.cfg.d_in).to(sae.W_enc.device, sae.W_enc.dtype)
    sae_in = sae.process_sae_in(x)
    n_tokens, n_latents = sae_in.shape[0], sae.cfg.d_sae
    blocks = latent_blocks(n_tokens, n_latents, max_block_bytes)
    if isinstance(counts, int):
        value = _global_threshold(sae, sae_in, blocks, counts)
        thresholds = torch.full((n_latents,), value, dtype=torch.double)
    else:
        thresholds = torch.cat(
            [
                _per_latent_thresholds(latent_scores(sae, sae_in, s), counts[s])
                for s in blocks
            ]
        ).double()
    return thresholds.clamp(min=0).to(sae.W_enc.device)


def _per_latent_thresholds(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per column, midway between the ``count``-th and next largest scores.

    Midway, so that the float rounding of a differently folded copy of the weights
    cannot flip a boundary token; -inf when the count is every token, the largest
    score when it is 0.
    """
    n_tokens = scores.shape[0]
    counts = counts.to(scores.device)
    depth = min(n_tokens, int(counts.max()) + 1)
    ordered = scores.float().topk(depth, dim=0).values
    last_kept = ordered.gather(0, (counts - 1).clamp(0, depth - 1)[None])[0]
    first_dropped = ordered.gather(0, counts.clamp(max=depth - 1)[None])[0]
    midway = torch.where(counts > 0, (last_kept + first_dropped) / 2, first_dropped)
    return torch.where(counts >= n_tokens, -torch.inf, midway)


def _global_threshold(
    sae: Any, sae_in: torch.Tensor, blocks: list[slice], count: int
) -> float:
    """Midway between the ``count``-th and next largest of all scores."""
    kept = sae_in.new_empty(0, dtype=torch.float32)
    for latents in blocks:
        scores = latent_scores(sae, sae_in, latents).float().flatten()
        merged = torch.cat([kept, scores])
        kept = merged.topk(min(count + 1, merged.numel())).values
    if kept.numel() <= count:
        return -float("inf")
    return float(kept[count] if count == 0 else (kept[count - 1] + kept[count]) / 2)


@torch.no_grad()
def norm_corrected_counts(
    sae: Any,
    activations: torch.Tensor,
    thresholds: torch.Tensor,
    counts: int | torch.Tensor,
    norms: torch.Tensor,
    population_mean_norm: float,
) -> int | torch.Tensor:
    """``counts`` for a random sample, corrected for its mean input norm.

    Which latents an input fires follows its norm closely, so a sample holding more
    large-norm inputs than the population would set thresholds too high. Per latent,
    the slope of "fires" on the norm over the sample predicts the population's firing
    rate (a regression estimator); the corrected counts make that prediction equal to
    the asked rate: ``count + slope * n * (sample mean - population mean)``. A global
    count is corrected alike; per-latent counts are rounded by largest remainder,
    within [0, n] each. Left as they are when the norms' spread is at the float
    resolution of ``activations``.

    Args:
        sae: the SAE.
        activations: (n, d_in) the sample.
        thresholds: (d_sae,) thresholds that fire ``counts`` on the sample.
        counts: an int or (d_sae,) counts.
        norms: (n,) the sample's input norms.
        population_mean_norm: the mean norm of the population it was drawn from.
    """
    x = activations.reshape(-1, sae.cfg.d_in).to(sae.W_enc.device, sae.W_enc.dtype)
    x = sae.process_sae_in(x)
    norms = norms.to(x.device, torch.float64)
    centred = norms - norms.mean()
    spread = float(centred.square().sum())
    n_tokens = x.shape[0]
    resolution = torch.finfo(activations.dtype).eps * abs(float(norms.mean()))
    if spread <= n_tokens * (NORM_RESOLUTION_UNITS * resolution) ** 2:
        return counts  # no spread beyond rounding: nothing to correct for
    excess = n_tokens * (float(norms.mean()) - population_mean_norm)
    weights = centred.float()[None]
    fires = [
        (weights @ (latent_scores(sae, x, s) > thresholds[s].to(x.device)).float())[0]
        for s in latent_blocks(n_tokens, sae.cfg.d_sae)
    ]
    slopes = torch.cat(fires).double() / spread
    if isinstance(counts, int):
        corrected = counts + round(excess * float(slopes.sum()))
        return min(max(corrected, 0), n_tokens * sae.cfg.d_sae)
    target = (counts.to(slopes) + excess * slopes).clamp(0, n_tokens)
    total = round(float(target.sum()))
    return round_capacities(target, torch.zeros_like(target), total, n_tokens)[0]


@torch.no_grad()
def norm_corrected_thresholds(
    sae: Any,
    activations: torch.Tensor,
    counts: int | torch.Tensor,
    norms: torch.Tensor,
    population_mean_norm: float,
) -> torch.Tensor:
    """Thresholds exact on a sample for counts corrected by its mean norm.

    Calibrated once with ``counts`` to measure the slopes of
    :func:`norm_corrected_counts`, then with the corrected counts. (d_sae,) float64.
    """
    exact = thresholds_for_counts(sae, activations, counts)
    corrected = norm_corrected_counts(
        sae, activations, exact, counts, norms, population_mean_norm
    )
    return thresholds_for_counts(sae, activations, corrected)
