"""What the three training SAEs share on top of their SAELens parents.

:class:`AllocationSAEMixin` goes first in the bases of each training SAE. It adds

- input validation (last dimension, empty batches, non-finite values) with clear errors;
- the choice of training step: the sparse step (:mod:`sae_mutual_choice.fast.sparse_step`) when
  ``sparse_training`` is on, else SAELens's dense step (the reference);
- each latent's running firing rate (a persistent buffer, so checkpoints keep it), and the
  architecture's other running statistics, updated from the fired pairs of either step;
- the auxiliary loss (``aux_zipf``, ``aux_k`` or none) with its coefficient scheduled through
  ``get_coefficients()``, and its metrics (under-used latents, fitted Zipf exponent);
- removal of these training-only buffers from the exported inference state dict;
- with ``data_parallel``, training steps on the joined batch of all ranks (``step_ranks``; the
  collectives are in :mod:`sae_mutual_choice.fast.collectives`).
"""

from typing import Any

import torch
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput

from sae_mutual_choice.fast.aux_selection import aux_selection
from sae_mutual_choice.fast.collectives import check_same_over_ranks, sum_over_ranks, world_size
from sae_mutual_choice.fast.config import sparse_step_is_faster
from sae_mutual_choice.fast.host_reads import host_reads_are_free
from sae_mutual_choice.fast.selection import Entries, firing_statistics
from sae_mutual_choice.fast.sparse_step import SparseStep
from sae_mutual_choice.upstream.aux_zipf import aux_zipf_loss, underuse_weights
from sae_mutual_choice.upstream.running import debiased, ema_update_

AUX_COEFFICIENT = "aux_loss"


NONFINITE_MESSAGE = "activations contain NaN or infinite values"
# Without free host reads, a training step records non-finite inputs on the device; the record is
# read at SAELens's logging steps, every this many steps, and before the SAE is saved.
NONFINITE_CHECK_INTERVAL = 100


def validate_activations(x: torch.Tensor, d_in: int, finite: bool = True) -> None:
    """Raise ``ValueError`` for input an SAE with ``d_in`` inputs cannot encode (with ``finite``, NaN/inf too)."""
    if x.ndim == 0 or x.shape[-1] != d_in:
        raise ValueError(f"activations must have last dimension d_in={d_in}, got shape {list(x.shape)}")
    if x.shape[:-1].numel() == 0:
        raise ValueError(f"activations must hold at least one token, got shape {list(x.shape)}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(NONFINITE_MESSAGE)


def with_bias(products: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``products + bias``, in place when the dtypes agree, else in the wider dtype (bf16 autocast)."""
    return products.add_(bias) if products.dtype == bias.dtype else products + bias


class AllocationSAEMixin:
    """Shared training behaviour; see the module docstring. Call :meth:`_init_allocation_state` last in ``__init__``."""

    cfg: Any
    W_enc: torch.nn.Parameter
    b_enc: torch.nn.Parameter
    W_dec: torch.nn.Parameter
    training_only_buffers: list[str]
    latent_usage: torch.Tensor
    latent_usage_weight: torch.Tensor

    def _init_allocation_state(self) -> None:
        self.training_only_buffers = []
        d_sae = self.cfg.d_sae
        self.register_training_buffer("latent_usage", torch.zeros(d_sae))
        self.register_training_buffer("latent_usage_weight", torch.zeros(()))
        # Logged through TrainStepOutput.metrics; tensors are read by SAELens at logging steps only.
        self.step_metrics: dict[str, float | torch.Tensor] = {}
        # Ranks the current training step's batch is split over (1 outside a data-parallel step).
        self.step_ranks = 1
        # Inside training_forward_pass: inputs checked by check_training_inputs (not by encode), and the
        # running statistics may change (nowhere else).
        self.in_training_step = False
        # The first training step (since this SAE was built or loaded) with non-finite inputs, on the
        # inputs' device; -1 or None: none. Not a buffer: SAELens may build SAEs on the meta device.
        self.first_nonfinite_step: torch.Tensor | None = None

    def register_training_buffer(self, name: str, value: torch.Tensor) -> None:
        """A persistent buffer that checkpoints keep and the inference export drops."""
        self.register_buffer(name, value.to(self.W_dec.device))  # type: ignore[attr-defined]
        self.training_only_buffers.append(name)

    @property
    def statistics_rate(self) -> float:
        """EMA rate of the running statistics: ``1 / usage_window``."""
        return 1.0 / self.cfg.usage_window

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        validate_activations(self.heads_flattened(x), self.cfg.d_in, finite=not self.in_training_step)
        return super().encode_with_hidden_pre(x)  # type: ignore[misc]

    def heads_flattened(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``process_sae_in`` will see it: with SAELens's hook_z reshaping on, its inputs are
        ``[..., n_heads, d_head]`` and the heads are flattened into ``d_in`` (a view); else ``x``."""
        if getattr(self, "hook_z_reshaping_mode", False) and x.ndim >= 2:
            return x.flatten(-2)
        return x

    def check_training_inputs(self, step_input: TrainStepInput) -> None:
        """Refuse a training batch the SAE cannot encode: its shape at once; NaN/inf at once where host
        reads are free, else recorded on the device and raised when the record is read (see
        :meth:`raise_on_nonfinite_inputs`): at logging steps, every ``NONFINITE_CHECK_INTERVAL`` steps
        and before saving."""
        x = step_input.sae_in
        immediate = host_reads_are_free(x)
        validate_activations(x, self.cfg.d_in, finite=immediate)
        if immediate:
            return
        step = step_input.n_training_steps
        record = self.first_nonfinite_step
        if record is None or record.device != x.device:
            record = self.first_nonfinite_step = torch.tensor(-1, device=x.device)
        record.copy_(torch.where((record < 0) & ~torch.isfinite(x).all(), step, record))
        if step_input.is_logging_step or step % NONFINITE_CHECK_INTERVAL == 0:
            self.raise_on_nonfinite_inputs()

    def raise_on_nonfinite_inputs(self) -> None:
        """Raise ``ValueError`` if a training step since this SAE was built or loaded had NaN/inf inputs (a host read)."""
        step = -1 if self.first_nonfinite_step is None else int(self.first_nonfinite_step)
        if step >= 0:
            raise ValueError(
                f"{NONFINITE_MESSAGE} (first at training step {step}); the weights trained since are not usable"
            )

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        if self.cfg.aux_loss == "none":
            return {}
        return {
            AUX_COEFFICIENT: TrainCoefficientConfig(
                value=self.cfg.aux_loss_coefficient,
                warm_up_steps=self.cfg.aux_loss_warm_up_steps,
            )
        }

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One training step; with ``data_parallel`` and several ranks, a step on the joined batch.

        Each rank then passes its slice of the batch (the same number of tokens on every rank) and
        gets its slice of the joined step: its fired pairs, its share of the losses (a mean over its
        own tokens, so gradients averaged over ranks are the joined batch's), and running statistics
        that are identical on every rank.
        """
        self.step_ranks = world_size() if self.cfg.data_parallel else 1
        self.in_training_step = True
        try:
            self.check_training_inputs(step_input)
            if self.step_ranks > 1:
                tokens = step_input.sae_in.shape[:-1].numel()
                check_same_over_ranks("the batch's token count", tokens, step_input.sae_in.device)
            if self.sparse_step_applies(step_input):
                output = SparseStep(self, step_input).run()
            else:
                output = super().training_forward_pass(step_input)  # type: ignore[misc]
            with torch.no_grad():
                counts, smallest = firing_statistics(output.feature_acts)
                n_tokens = output.sae_in.reshape(-1, self.cfg.d_in).shape[0]
                self.update_running_statistics(counts, smallest, n_tokens)
                self.record_training_inputs(step_input.sae_in)
        finally:
            self.step_ranks = 1
            self.in_training_step = False
        output.metrics.update(self.step_metrics)
        return output

    def record_training_inputs(self, sae_in: torch.Tensor) -> None:
        """Called with each training step's inputs after the step (the export keeps a sample)."""

    def joined_activations(self, scores: torch.Tensor) -> torch.Tensor:
        """Dense activations ``[..., F]`` of this rank's slice in a joined step, from :meth:`select_entries`."""
        flat = scores.reshape(-1, scores.shape[-1])
        with torch.no_grad():
            entries = self.select_entries(flat.detach())
            fires = torch.zeros_like(flat, dtype=torch.bool)
            fires[entries.rows, entries.cols] = entries.firing()
        return torch.where(fires, flat, flat.new_zeros(())).reshape(scores.shape)

    def sparse_step_applies(self, step_input: TrainStepInput) -> bool:
        """Whether this step runs sparse: ``sparse_training`` is on (or ``"auto"`` picks it for the
        input's device), the input is ``[B, d_in]``, and no hook is attached to the SAE (hooks see
        dense tensors, so a hooked SAE trains densely)."""
        sparse = self.cfg.sparse_training
        if sparse == "auto":
            sparse = sparse_step_is_faster(step_input.sae_in.device)
        if not sparse or step_input.sae_in.ndim != 2:
            return False
        if getattr(self, "hook_z_reshaping_mode", False):
            return False
        hook_points = self.hook_dict.values()  # type: ignore[attr-defined]
        return not any(hook._forward_hooks or hook._backward_hooks for hook in hook_points)

    @torch.no_grad()
    def encoder_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Raw scores ``x @ W_enc + b_enc`` of processed inputs ``[B, d_in] -> [B, F]`` (no decoder norms, no graph).

        Under bf16 autocast the matmul gives bf16 and the bias is added out of place, in the bias's
        float32, as in SAELens's dense step (in place it would be rounded to bf16); otherwise in place.
        """
        return with_bias(x @ self.W_enc, self.b_enc)

    def select_entries(self, hidden_pre: torch.Tensor) -> Entries:
        """The firing pairs of a batch's scores ``[B, F]`` (the sparse step's activation function)."""
        raise NotImplementedError

    @torch.no_grad()
    def update_running_statistics(
        self,
        counts: torch.Tensor,
        smallest: torch.Tensor,  # noqa: ARG002 (the subclasses' statistics use it)
        n_tokens: int,
    ) -> None:
        """Update the running statistics from a step's firing: each latent's number of fired pairs
        and its smallest fired activation (``[F]`` each, :func:`~sae_mutual_choice.fast.selection.firing_statistics`).

        ``n_tokens``: this rank's tokens; in a joined step, the statistics are the joined batch's.
        """
        if self.step_ranks > 1:
            counts = sum_over_ranks(counts)
        fired = counts.float() / (n_tokens * self.step_ranks)
        ema_update_(self.latent_usage, self.latent_usage_weight, fired, self.statistics_rate)

    def underuse(self, dead_neuron_mask: torch.Tensor | None) -> torch.Tensor:
        """Each latent's aux weight in ``[0, 1]`` for the configured ``aux_loss``. ``-> [F]``."""
        dead = (
            torch.zeros(self.cfg.d_sae, device=self.W_dec.device)
            if dead_neuron_mask is None
            else dead_neuron_mask.to(self.W_dec.device, torch.float32)
        )
        if self.cfg.aux_loss != "aux_zipf":
            return dead
        weights, exponent = underuse_weights(
            debiased(self.latent_usage, self.latent_usage_weight),
            self.cfg.zipf_fit_fraction,
            self.cfg.underuse_ratio,
        )
        self.step_metrics["usage_zipf_exponent"] = exponent
        # Under-use is judged with the evidence at hand: the estimate's weight (1 - (1 - 1/usage_window)
        # ** steps) scales the weights, so a latent that missed the first batches is not taken for dead
        # (and before any step, with weight 0, only the dead mask counts).
        return torch.maximum(weights.float() * self.latent_usage_weight.float(), dead)

    def aux_underuse(self, step_input: TrainStepInput) -> tuple[torch.Tensor, float] | None:
        """The aux loss's per-latent weights ``[F]`` and coefficient now; None when ``aux_loss`` is none."""
        if self.cfg.aux_loss == "none":
            return None
        underuse = self.underuse(step_input.dead_neuron_mask)
        self.step_metrics["underused_latents"] = (underuse > 0).sum()
        coefficient = step_input.coefficients.get(AUX_COEFFICIENT)
        return underuse, self.cfg.aux_loss_coefficient if coefficient is None else coefficient

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,  # noqa: ARG002
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
            select=aux_selection,
        )
        return {"auxiliary_reconstruction_loss": loss}

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        self.raise_on_nonfinite_inputs()  # no checkpoint or export of weights trained on NaN/inf
        super().process_state_dict_for_saving(state_dict)  # type: ignore[misc]

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)  # type: ignore[misc]
        for name in self.training_only_buffers:
            state_dict.pop(name, None)
