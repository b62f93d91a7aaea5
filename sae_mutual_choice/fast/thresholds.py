"""Thresholds for the per-token (JumpReLU) export of Mutual and Feature Choice SAEs.

At inference the batch is gone, so a latent fires when its score exceeds a threshold. Where the
exported thresholds come from, first match wins:

1. an explicit :func:`calibrate_thresholds` on activations the user supplies (until training
   moves on); a checkpoint pins the thresholds it would export here, see below;
2. the calibration on a uniform random sample of ``threshold_calibration_tokens`` of all
   training inputs (reservoir sampling), computed with the final weights when the inference model
   is saved: exact on the sample, for counts corrected for the sample's mean input norm against
   the run's (:func:`sample_thresholds`);
3. the bias-corrected running estimate kept during training (also logged as a metric).

The sample is uniform over the whole run, not the latest inputs: a corpus read in order (the
embedded one is by date) makes the latest inputs a few documents, whose thresholds do not carry
over to other text. It lives in memory only: a checkpoint holds the F thresholds computed from
it with the checkpoint's weights (in ``calibrated_thresholds``), not copies of model activations;
a resumed run samples afresh from the inputs it sees (and sums their norms afresh).

The order statistics themselves are in :mod:`sae_mutual_choice.upstream.calibration`.
"""

from typing import Any

import torch

from sae_mutual_choice.fast.base import validate_activations
from sae_mutual_choice.fast.collectives import gather_over_ranks, rank
from sae_mutual_choice.upstream.calibration import norm_corrected_thresholds, thresholds_for_counts

LEGACY_CHECKPOINT_BUFFERS = ("recent_inputs", "recent_inputs_filled", "recent_inputs_next")


class JumpReLUExportMixin:
    """Threshold sources and the JumpReLU export, for an SAE that also has ``AllocationSAEMixin``.

    The host class provides ``ema_thresholds()`` (``[F]``, its running estimate) and
    ``calibration_counts(n_tokens)`` (an int for one global count, or a tensor ``[F]`` of
    per-latent counts). The sampled training inputs are exactly what ``training_forward_pass``
    received, so they go through ``process_sae_in`` like any input.
    """

    cfg: Any
    W_enc: torch.nn.Parameter
    W_dec: torch.nn.Parameter
    b_enc: torch.nn.Parameter
    calibration_inputs: torch.Tensor
    calibration_norms: torch.Tensor
    calibration_keys: torch.Tensor
    input_norm_totals: torch.Tensor
    calibrated_thresholds: torch.Tensor

    def _init_export_state(self) -> None:
        self._reset_calibration_sample()
        # NaN: no explicit calibration in force.
        self.register_training_buffer(  # type: ignore[attr-defined]
            "calibrated_thresholds", torch.full((self.cfg.d_sae,), torch.nan, dtype=torch.double)
        )

    def _reset_calibration_sample(self, n: int = 0) -> None:
        """An empty sample of ``n`` slots, on the weights' device (buffers left out of checkpoints, so
        not loaded). Built and loaded SAEs hold 0 slots; the first training step allocates
        ``threshold_calibration_tokens`` (:meth:`_allocate_calibration_sample`), so an SAE that never
        trains (loaded for analysis, or built by SAELens on the meta device) costs no sample memory."""
        device = self.W_dec.device
        inputs = torch.zeros(n, self.cfg.d_in, dtype=self.W_dec.dtype, device=device)
        register = self.register_buffer  # type: ignore[attr-defined]
        register("calibration_inputs", inputs, persistent=False)
        # Each sampled input's norm as training saw it, the space of input_norm_totals: not derivable
        # from the sample, which folding the scaling or whitening maps back to raw activations.
        # Float64, as the totals: with nearly constant norms (a LayerNorm'd hook point) float32 rounding
        # of the sum moves the run's mean by more than the sample's whole spread.
        register("calibration_norms", torch.zeros(n, dtype=torch.double, device=device), persistent=False)
        register(
            "calibration_keys", torch.full((n,), -torch.inf, device=device), persistent=False
        )  # -inf: empty
        # Every input seen since: (sum of norms, count), the population the sample is drawn from.
        register("input_norm_totals", torch.zeros(2, dtype=torch.double, device=device), persistent=False)
        self._sampling_generator: torch.Generator | None = None

    def _allocate_calibration_sample(self) -> None:
        """Give the sample its ``threshold_calibration_tokens`` slots, once (nothing if it has them)."""
        n = self.cfg.threshold_calibration_tokens
        if self.calibration_keys.shape[0] != n:
            self._reset_calibration_sample(n)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        self._reset_calibration_sample()  # a loaded SAE samples afresh from the inputs it trains on
        return result

    def ema_thresholds(self) -> torch.Tensor:
        raise NotImplementedError

    def calibration_counts(self, n_tokens: int) -> int | torch.Tensor:
        raise NotImplementedError

    def record_training_inputs(self, sae_in: torch.Tensor) -> None:
        self.remember_inputs(sae_in)

    @torch.no_grad()
    def remember_inputs(self, sae_in: torch.Tensor) -> None:
        """Add a batch to the uniform sample of training inputs, and drop any explicit calibration.

        Reservoir sampling by random keys: every input gets a uniform key and the sample is the
        ``threshold_calibration_tokens`` inputs with the largest keys seen so far. Computed on the
        device, with no host synchronisation. In a data-parallel step every rank draws the joined
        batch's keys and keeps those of its slice, so the ranks' samples together hold the joined
        run's sample (:func:`calibrate_over_ranks`). Each input's norm is kept with it, and the
        norms of all inputs are summed, for the export's correction (:func:`sample_thresholds`).
        """
        self.calibrated_thresholds.fill_(torch.nan)
        capacity = self.cfg.threshold_calibration_tokens
        if capacity == 0:
            return
        self._allocate_calibration_sample()
        rows = sae_in.detach().reshape(-1, self.cfg.d_in)
        norms = rows.double().norm(dim=-1)
        self.input_norm_totals[0] += norms.sum()
        self.input_norm_totals[1] += rows.shape[0]
        n_ranks = self.step_ranks  # type: ignore[attr-defined]
        keys = torch.rand(rows.shape[0] * n_ranks, generator=self._generator(), device=rows.device)
        if n_ranks > 1:
            keys = keys.view(n_ranks, -1)[rank()]
        kept = torch.cat([self.calibration_keys, keys.to(self.calibration_keys)]).topk(capacity).indices
        chosen = torch.zeros(capacity + rows.shape[0], dtype=torch.bool, device=kept.device)
        chosen[kept] = True
        # Pair the evicted slots with the chosen new rows: both come first in their orderings, and
        # the first n_new pairs (as many slots as rows) are written; the rest rewrite what is there.
        n_pairs = min(capacity, rows.shape[0])
        slots = torch.sort(chosen[:capacity].to(torch.int8), stable=True).indices[:n_pairs]
        new = torch.sort(chosen[capacity:].to(torch.int8), descending=True, stable=True).indices[:n_pairs]
        write = torch.arange(n_pairs, device=kept.device) < chosen[capacity:].sum()
        self.calibration_inputs[slots] = torch.where(
            write[:, None], rows[new].to(self.calibration_inputs), self.calibration_inputs[slots]
        )
        self.calibration_norms[slots] = torch.where(write, norms[new], self.calibration_norms[slots])
        self.calibration_keys[slots] = torch.where(write, keys[new], self.calibration_keys[slots])

    def _generator(self) -> torch.Generator:
        """The sampler's own random stream (the global one stays the user's), on the buffers' device."""
        device = self.calibration_keys.device
        if self._sampling_generator is None or self._sampling_generator.device != device:
            self._sampling_generator = torch.Generator(device=device).manual_seed(0)
        return self._sampling_generator

    def calibration_sample(self) -> torch.Tensor:
        """The sampled training inputs ``[n, d_in]`` (n up to ``threshold_calibration_tokens``), by key, largest first."""
        return sample_by_key(self.calibration_keys, self.calibration_inputs)

    def set_inference_thresholds(self, thresholds: torch.Tensor) -> None:
        """Pin the exported thresholds (``[F]``) until the next training step."""
        with torch.no_grad():
            self.calibrated_thresholds.copy_(thresholds)

    def inference_thresholds(self) -> torch.Tensor:
        """The thresholds the JumpReLU export uses now (see the module docstring). ``-> [F]``.

        Raises ``ValueError`` when there is none to export (no training step, no calibration).
        """
        if not bool(self.calibrated_thresholds.isnan().any()):
            thresholds = self.calibrated_thresholds
        elif bool(torch.isfinite(self.calibration_keys).any()):
            norms = sample_by_key(self.calibration_keys, self.calibration_norms)
            thresholds = sample_thresholds(self, self.calibration_sample(), norms, self.input_norm_totals)
        else:
            thresholds = self.ema_thresholds()
        if not bool(torch.isfinite(thresholds).any()):
            raise ValueError(
                f"{self.cfg.architecture()} SAE has no threshold to export: it has taken no training step "
                "and has no calibration. Train it, call calibrate_thresholds(sae, activations), or pin "
                "thresholds with set_inference_thresholds (a running estimate is read as raw / weight, "
                "e.g. topk_threshold / topk_threshold_weight: setting the raw value alone leaves it unset)"
            )
        return thresholds.to(self.b_enc.dtype)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)  # type: ignore[misc]
        # The sampled inputs were scaled by the factor; the folded SAE takes unscaled inputs.
        self.calibration_inputs /= scaling_factor
        if self.cfg.rescale_acts_by_decoder_norm:
            # Scores carry the decoder norms, which the fold just divided by the factor.
            self.calibrated_thresholds /= scaling_factor

    @torch.no_grad()
    def fold_activation_whitening(
        self, mean: torch.Tensor, whitening_matrix: torch.Tensor, unwhitening_matrix: torch.Tensor
    ) -> None:
        super().fold_activation_whitening(mean, whitening_matrix, unwhitening_matrix)  # type: ignore[misc]
        # Scores are unchanged by the fold; the sampled (whitened) inputs go back to raw activations.
        inputs = self.calibration_inputs
        raw = inputs.double() @ unwhitening_matrix.double().to(inputs.device)
        inputs.copy_(raw + mean.double().to(raw.device))

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving(state_dict)  # type: ignore[misc]
        # A checkpoint keeps what its export needs, not the sampled activations (module docstring).
        if bool(torch.isfinite(self.calibration_keys).any()) or not bool(
            self.calibrated_thresholds.isnan().any()
        ):
            state_dict["calibrated_thresholds"] = self.inference_thresholds().double()

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)  # type: ignore[misc]
        for name in LEGACY_CHECKPOINT_BUFFERS:  # earlier checkpoints kept the last inputs themselves
            state_dict.pop(name, None)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)  # type: ignore[misc]
        state_dict["threshold"] = self.inference_thresholds()


def sample_by_key(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The values (inputs ``[N, d_in]`` or norms ``[N]``) with a finite key, ordered by key (largest
    first, ties in slot order). ``-> [n, ...]``."""
    order = keys.argsort(descending=True, stable=True)
    return values[order][torch.isfinite(keys[order])]


@torch.no_grad()
def sample_thresholds(
    sae: JumpReLUExportMixin, sample: torch.Tensor, norms: torch.Tensor, norm_totals: torch.Tensor
) -> torch.Tensor:
    """Thresholds from a uniform sample of the run's inputs: exact on it, with norm-corrected counts.

    ``sample [n, d_in]`` and its inputs' norms ``norms [n]`` were drawn from the run's inputs, whose
    norms sum to ``norm_totals[0]`` over ``norm_totals[1]`` inputs. The counts are the SAE's own for
    ``n`` tokens, corrected for the sample's mean norm (:func:`~sae_mutual_choice.upstream.calibration.
    norm_corrected_counts`): a large-norm input fires many latents, so the count of such inputs
    that a sample happens to draw moves the thresholds, and the correction removes most of that
    noise. When the sample is every input the run saw, the counts stay exact. ``-> [F]`` float64.
    """
    n_tokens = sample.shape[0]
    norm_sum, n_seen = norm_totals.tolist()
    if n_seen <= n_tokens:
        return exact_thresholds(sae, sample)
    return norm_corrected_thresholds(sae, sample, sae.calibration_counts(n_tokens), norms, norm_sum / n_seen)


@torch.no_grad()
def calibrate_over_ranks(sae: JumpReLUExportMixin) -> None:
    """Pin, on every rank, the thresholds that the joined run's calibration sample gives (a collective).

    Data-parallel training keeps the calibration sample per rank. This gathers the ranks'
    samples, keeps the ``threshold_calibration_tokens`` inputs with the largest keys (the sample a
    single process would hold after training on the joined batches) and pins the exact thresholds
    computed on it, as :func:`calibrate_thresholds` does, until the next training step. Call it on
    every rank before rank 0 saves a checkpoint or the inference model. Sends ``N x d_in`` values.
    """
    capacity = sae.cfg.threshold_calibration_tokens
    sae._allocate_calibration_sample()  # a rank that took no step gathers an empty sample of the same size
    keys = gather_over_ranks(sae.calibration_keys).reshape(-1)
    if capacity == 0 or not bool(torch.isfinite(keys).any()):
        return
    inputs = gather_over_ranks(sae.calibration_inputs).reshape(-1, sae.cfg.d_in)
    norms = gather_over_ranks(sae.calibration_norms).reshape(-1)
    totals = gather_over_ranks(sae.input_norm_totals).reshape(-1, 2).sum(0)
    kept = keys.topk(capacity).indices
    sample, sample_norms = sample_by_key(keys[kept], inputs[kept]), sample_by_key(keys[kept], norms[kept])
    sae.set_inference_thresholds(sample_thresholds(sae, sample, sample_norms, totals))


@torch.no_grad()
def exact_thresholds(sae: JumpReLUExportMixin, activations: torch.Tensor) -> torch.Tensor:
    """Exact thresholds of ``sae`` on ``activations`` (``[..., d_in]``); never below 0. ``-> [F]`` float64."""
    n_tokens = activations.reshape(-1, sae.cfg.d_in).shape[0]
    return thresholds_for_counts(sae, activations, sae.calibration_counts(n_tokens))


def calibrate_thresholds(sae: Any, activations: torch.Tensor) -> torch.Tensor:
    """Set ``sae``'s exported thresholds exactly from ``activations`` and return them (``[F]``).

    ``sae``: a ``mutual_choice`` or ``feature_choice`` training SAE after training.
    ``activations``: ``[..., d_in]`` raw activations from the training distribution, preferably
    held out. The next ``save_inference_model`` (or the runner's final save) exports these
    thresholds; on these activations the exported JumpReLU SAE then has mean L0
    ``int(k * N) / N`` (Mutual Choice), or fires each latent on exactly its capacity's worth of
    tokens (Feature Choice). A training step afterwards drops the calibration.
    """
    if not isinstance(sae, JumpReLUExportMixin):
        raise TypeError(
            f"calibrate_thresholds takes a mutual_choice or feature_choice training SAE, got {type(sae).__name__}"
        )
    validate_activations(activations, sae.cfg.d_in)
    sae.set_inference_thresholds(exact_thresholds(sae, activations))
    return sae.inference_thresholds()
