"""The sparse training step: only the selected (token, latent) pairs go past the encoder matmul.

SAELens's step keeps ``[B, F]`` activations with an autograd graph, decodes them with a dense
matmul and back-propagates densely, though only about k·B of the B·F pairs fire. Here:

1. the scores ``hidden_pre [B, F]`` are computed once, without an autograd graph;
2. the SAE selects the firing pairs (:mod:`sae_mutual_choice.selection`) and, for the aux loss,
   each token's under-used latents (:func:`~sae_mutual_choice.aux_zipf.aux_selection`);
3. :class:`SelectedScores` gives those pairs their scores with a gradient that flows to the
   encoder through the selected pairs only (sums over the pairs, via ``embedding_bag``);
4. decoding is an ``embedding_bag`` of decoder rows weighted by the activations.

Losses and gradients equal the dense step's (tested at relative error 1e-4 in float32); memory
and compute after the encoder matmul scale with the number of selected pairs. The output keeps
SAELens's trainer contract: ``feature_acts`` is a sparse COO ``[B, F]`` tensor, which the trainer's
firing statistics accept.
"""

from typing import Any

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput

from sae_mutual_choice.aux_zipf import aux_reconstruction_loss, aux_selection
from sae_mutual_choice.selection import Entries


def _bag_offsets(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Start of each group in a list sorted by group id (``embedding_bag`` offsets). ``-> [n_groups]``.

    Counted with ``index_add_``, not ``bincount``, which reads the largest id on the host on CUDA.
    """
    sizes = torch.zeros(n_groups, dtype=groups.dtype, device=groups.device)
    sizes.index_add_(0, groups, torch.ones_like(groups))
    return sizes.cumsum(0) - sizes


def bag_sum(
    groups: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, n_groups: int
) -> torch.Tensor:
    """``out[g] = sum of weights[i] * table[rows[i]] over i with groups[i] == g``; groups sorted. ``-> [n_groups, d]``."""
    return F.embedding_bag(
        rows, table, _bag_offsets(groups, n_groups), mode="sum", per_sample_weights=weights.to(table.dtype)
    )


class SelectedScores(torch.autograd.Function):
    """The encoder scores ``x @ W_enc + b_enc`` at selected pairs, differentiable through those pairs only.

    Forward returns ``values`` (the scores at the pairs, computed already without a graph); backward
    sends each pair's gradient to its token's input, its latent's encoder column and bias.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,  # noqa: ARG004 (an input, so that it receives its gradient)
        rows: torch.Tensor,
        cols: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, W_enc, rows, cols)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        x, W_enc, rows, cols = ctx.saved_tensors
        n_tokens, n_latents = x.shape[0], W_enc.shape[1]
        grad_x = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:  # rows are sorted: group by token
            grad_x = bag_sum(rows, cols, grad, W_enc.t().contiguous(), n_tokens)
        if ctx.needs_input_grad[1]:  # group by latent
            cols_sorted, order = cols.sort(stable=True)
            grad_W_enc = bag_sum(cols_sorted, rows[order], grad[order], x, n_latents).t()
        if ctx.needs_input_grad[2]:
            grad_b_enc = torch.zeros_like(W_enc[0]).index_add_(0, cols, grad.to(W_enc.dtype))
        return grad_x, grad_W_enc, grad_b_enc, None, None, None


class SparseStep:
    """One sparse training step of ``sae``; see the module docstring.

    ``sae`` is one of this package's training SAEs: it provides ``encoder_scores(x)`` (raw scores,
    any memory layout), ``select_entries(hidden_pre)`` (the firing pairs) and
    ``aux_underuse(step_input)`` (aux weights and coefficient, or None).
    """

    def __init__(self, sae: Any, step_input: TrainStepInput):
        self.sae = sae
        self.step_input = step_input
        self.x = sae.process_sae_in(step_input.sae_in)
        self.norms = sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None
        with torch.no_grad():
            self.raw = sae.encoder_scores(self.x)
            self.hidden_pre = self.raw if self.norms is None else self.raw * self.norms.detach()

    def scores_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``hidden_pre`` at the pairs, with gradient (as the dense step's, decoder norms included)."""
        sae = self.sae
        values = SelectedScores.apply(self.x, sae.W_enc, sae.b_enc, rows, cols, self.raw[rows, cols])
        # index_select, not indexing: its backward is an index_add_ (indexing's accumulates more slowly).
        return values if self.norms is None else values * self.norms.index_select(0, cols)

    def decode(self, rows: torch.Tensor, cols: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """``sum_j acts[t, j] * W_dec[j]`` per token, without ``b_dec``; rows sorted. ``-> [B, d_in]``."""
        if self.norms is not None:
            acts = acts * (1 / self.norms).index_select(0, cols)
        return bag_sum(rows, cols, acts, self.sae.W_dec, self.x.shape[0])

    def run(self) -> TrainStepOutput:
        sae, sae_in = self.sae, self.step_input.sae_in
        with torch.no_grad():
            entries: Entries = sae.select_entries(self.hidden_pre)
        acts = self.scores_at(entries.rows, entries.cols)
        if entries.fires is not None:  # a fixed-size selection: pairs that do not fire count 0
            acts = torch.where(entries.fires, acts, acts.new_zeros(()))
        recons = self.decode(entries.rows, entries.cols, acts) + sae.b_dec
        sae_out = sae.run_time_activation_norm_fn_out(sae.hook_sae_recons(recons))
        mse_loss = sae.mse_loss_fn(sae_out, sae_in).sum(dim=-1).mean()
        losses = {"mse_loss": mse_loss}
        aux = sae.aux_underuse(self.step_input)
        if aux is not None:
            losses["auxiliary_reconstruction_loss"] = self.aux_loss(sae_out, *aux)
        feature_acts = torch.sparse_coo_tensor(
            torch.stack([entries.rows, entries.cols]),
            acts.detach(),
            self.hidden_pre.shape,
            is_coalesced=True,
            check_invariants=False,
        )
        return TrainStepOutput(
            sae_in=sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=self.hidden_pre,
            loss=sum(losses.values(), torch.zeros((), device=sae_in.device)),
            losses=losses,
        )

    def aux_loss(self, sae_out: torch.Tensor, underuse: torch.Tensor, coefficient: float) -> torch.Tensor:
        """The aux loss of :func:`~sae_mutual_choice.aux_zipf.aux_zipf_loss`, on the selected pairs only."""
        sae_in = self.step_input.sae_in
        selection = aux_selection(self.hidden_pre, underuse, sae_in.shape[-1])
        if selection is None:
            return sae_out.new_tensor(0.0)
        n_tokens, k_aux = selection.latents.shape
        rows = torch.arange(n_tokens, device=sae_in.device).repeat_interleave(k_aux)
        cols = selection.latents.reshape(-1)
        acts = self.scores_at(rows, cols) * selection.weights.reshape(-1)
        recons = self.decode(rows, cols, acts)
        return aux_reconstruction_loss(recons, sae_in, sae_out, selection.scale, coefficient)
