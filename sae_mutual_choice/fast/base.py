"""What the fast and distributed layer adds to the SAELens-shaped training SAEs.

:class:`FastStepMixin` goes first in the bases of each training SAE here, before its
:mod:`sae_mutual_choice.upstream` class (or the shared base, for Token Choice). It adds

- input validation (last dimension, empty batches, non-finite values) with clear errors;
- the choice of training step: the sparse step (:mod:`sae_mutual_choice.fast.sparse_step`)
  when ``sparse_training`` is on, else SAELens's dense step (the reference);
- the aux candidate search with host reads where they are free (:mod:`.aux_selection`);
- with ``data_parallel``, training steps on the joined batch of all ranks (``step_ranks``):
  the joined selection, and the running statistics and calibration sample reduced over ranks
  (the collectives are in :mod:`sae_mutual_choice.fast.collectives`).

The upstream classes know nothing of this: each hook here overrides one of their methods.
"""

from typing import Any

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput

from sae_mutual_choice.fast.aux_selection import aux_selection
from sae_mutual_choice.fast.collectives import (
    check_same_over_ranks,
    min_over_ranks,
    rank,
    sum_over_ranks,
    world_size,
)
from sae_mutual_choice.fast.config import sparse_step_is_faster
from sae_mutual_choice.fast.host_reads import host_reads_are_free
from sae_mutual_choice.fast.selection import Entries, firing_statistics
from sae_mutual_choice.fast.sparse_step import SparseStep
from sae_mutual_choice.upstream.adaptive_allocation import (
    NONFINITE_MESSAGE,
    AuxSelection,
    validate_activations,
)

# Without free host reads, a training step records non-finite inputs on the device; the record is
# read at SAELens's logging steps, every this many steps, and before the SAE is saved.
NONFINITE_CHECK_INTERVAL = 100
# Buffers of 0.4.0-0.4.2 checkpoints (they kept the last inputs themselves); dropped on loading.
LEGACY_CHECKPOINT_BUFFERS = ("recent_inputs", "recent_inputs_filled", "recent_inputs_next")


def with_bias(products: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``products + bias``, in place when the dtypes agree, else in the wider dtype (bf16 autocast)."""
    return products.add_(bias) if products.dtype == bias.dtype else products + bias


class FastStepMixin:
    """The fast and distributed training step; see the module docstring."""

    cfg: Any
    W_enc: torch.nn.Parameter
    b_enc: torch.nn.Parameter
    W_dec: torch.nn.Parameter
    in_training_step: bool

    def __init__(self, cfg: Any, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[call-arg]
        # Ranks the current training step's batch is split over (1 outside a data-parallel step).
        self.step_ranks = 1
        # The first training step (since this SAE was built or loaded) with non-finite inputs, on the
        # inputs' device; -1 or None: none. Not a buffer: SAELens may build SAEs on the meta device.
        self.first_nonfinite_step: torch.Tensor | None = None

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

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One training step; with ``data_parallel`` and several ranks, a step on the joined batch.

        Each rank then passes its slice of the batch (the same number of tokens on every rank) and
        gets its slice of the joined step: its fired pairs, its share of the losses (a mean over its
        own tokens, so gradients averaged over ranks are the joined batch's), and running statistics
        that are identical on every rank.
        """
        self.step_ranks = world_size() if self.cfg.data_parallel else 1
        try:
            self.check_training_inputs(step_input)
            if self.step_ranks > 1:
                tokens = step_input.sae_in.shape[:-1].numel()
                check_same_over_ranks("the batch's token count", tokens, step_input.sae_in.device)
            return super().training_forward_pass(step_input)  # type: ignore[misc]
        finally:
            self.step_ranks = 1

    def training_step(self, step_input: TrainStepInput) -> TrainStepOutput:
        if self.sparse_step_applies(step_input):
            return SparseStep(self, step_input).run()
        return super().training_step(step_input)  # type: ignore[misc]

    def firing_statistics(self, feature_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return firing_statistics(feature_acts)  # dense, or the sparse step's sparse COO

    @torch.no_grad()
    def update_running_statistics(self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int) -> None:
        # In a joined step, the statistics are the joined batch's.
        if self.step_ranks > 1:
            counts, smallest = sum_over_ranks(counts), min_over_ranks(smallest)
            n_tokens *= self.step_ranks
        super().update_running_statistics(counts, smallest, n_tokens)  # type: ignore[misc]

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        """The activation on scores ``[..., F]``; in a data-parallel step, this rank's slice of the joined selection."""
        if self.step_ranks > 1:
            return self.joined_activations(scores)
        return super().activate(scores)  # type: ignore[misc]

    def tokens_in_batch(self, scores: torch.Tensor) -> int:
        return scores.shape[0] * self.step_ranks

    def sample_keys(self, n_rows: int) -> torch.Tensor:
        # In a joined step every rank draws the joined batch's keys and keeps its slice's, so the
        # ranks' samples together hold the joined run's (fast.thresholds.calibrate_over_ranks).
        keys = super().sample_keys(n_rows * self.step_ranks)  # type: ignore[misc]
        return keys.view(self.step_ranks, -1)[rank()] if self.step_ranks > 1 else keys

    def aux_selection(
        self, hidden_pre: torch.Tensor, underuse: torch.Tensor, d_in: int
    ) -> AuxSelection | None:
        return aux_selection(hidden_pre, underuse, d_in)

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

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        self.raise_on_nonfinite_inputs()  # no checkpoint or export of weights trained on NaN/inf
        super().process_state_dict_for_saving(state_dict)  # type: ignore[misc]

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_loading(state_dict)  # type: ignore[misc]
        for name in LEGACY_CHECKPOINT_BUFFERS:
            state_dict.pop(name, None)
