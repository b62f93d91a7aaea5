"""The sparse training step: only the selected (token, latent) pairs go past the encoder matmul.

SAELens's step keeps ``[B, F]`` activations with an autograd graph, decodes them with a dense
matmul and back-propagates densely, though only about k·B of the B·F pairs fire. Here:

1. the scores ``hidden_pre [B, F]`` are computed once, without an autograd graph;
2. the SAE selects the firing pairs (:mod:`sae_mutual_choice.fast.selection`) and, for the aux loss,
   each token's under-used latents (:func:`~sae_mutual_choice.fast.aux_selection.aux_selection`);
3. :class:`SelectedScores` gives those pairs their scores with a gradient that flows to the
   encoder through the selected pairs only (sums over the pairs per token and per latent, via
   ``embedding_bag``; to ``b_dec``, through the input, as one sum over latents);
4. decoding is an ``embedding_bag`` of decoder rows weighted by the activations, and the decoder's
   gradient another, over the same pairs grouped by latent (:class:`Pairs` groups them once).

Losses and gradients equal the dense step's (tested at relative error 1e-4 in float32); memory
and compute after the encoder matmul scale with the number of selected pairs. The output keeps
SAELens's trainer contract: ``feature_acts`` is a sparse COO ``[B, F]`` tensor, which the trainer's
firing statistics accept.
"""

from typing import Any

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput

from sae_mutual_choice.fast.aux_selection import aux_selection
from sae_mutual_choice.fast.selection import Entries
from sae_mutual_choice.upstream.adaptive_allocation import aux_reconstruction_loss


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


class Pairs:
    """Selected pairs ``(rows[i], cols[i])`` of ``n_tokens`` tokens and ``n_latents`` latents, ``rows`` sorted.

    Sums over the pairs per token or per latent; the order that groups them by latent is found once
    (by the first per-latent sum) and shared by every gradient that needs it.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_tokens: int, n_latents: int):
        self.rows, self.cols, self.n_tokens, self.n_latents = rows, cols, n_tokens, n_latents
        self._by_latent: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def per_token(self, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``out[t] = sum of weights[i] * table[cols[i]]`` over token t's pairs. ``-> [n_tokens, d]``."""
        return bag_sum(self.rows, self.cols, weights, table, self.n_tokens)

    def per_latent(self, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``out[j] = sum of weights[i] * table[rows[i]]`` over latent j's pairs. ``-> [n_latents, d]``."""
        if self._by_latent is None:
            cols, order = self.cols.sort(stable=True)
            self._by_latent = cols, self.rows.index_select(0, order), order
        cols, rows, order = self._by_latent
        return bag_sum(cols, rows, weights.index_select(0, order), table, self.n_latents)


class SelectedScores(torch.autograd.Function):
    """The encoder scores ``(x - shift) @ W_enc + b_enc`` at selected pairs, differentiable through
    those pairs only.

    Forward returns ``values`` (the scores at the pairs, computed already without a graph); backward
    sends each pair's gradient to its latent's encoder column and bias, and to its token's input ``x``,
    or, where ``x`` is a constant shifted by ``shift`` (:meth:`SparseStep.encoder_input`), to ``shift``:
    minus the per-latent gradient sums through ``W_enc``, a matrix-vector product instead of a sum per pair.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        shift: torch.Tensor,  # noqa: ARG004 (an input, so that it receives its gradient)
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,  # noqa: ARG004 (as shift)
        pairs: Pairs,
        values: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, W_enc)
        ctx.pairs = pairs
        return values.clone()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        x, W_enc = ctx.saved_tensors
        pairs: Pairs = ctx.pairs
        grad_x = grad_shift = grad_W_enc = grad_b_enc = None
        if ctx.needs_input_grad[0]:
            grad_x = pairs.per_token(grad, W_enc.t().contiguous())
        if ctx.needs_input_grad[2]:
            grad_W_enc = pairs.per_latent(grad, x).t()
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:  # per latent: b_enc's gradient
            per_latent = torch.zeros_like(W_enc[0]).index_add_(0, pairs.cols, grad.to(W_enc.dtype))
            grad_shift = -(W_enc @ per_latent) if ctx.needs_input_grad[1] else None
            grad_b_enc = per_latent if ctx.needs_input_grad[3] else None
        return grad_x, grad_shift, grad_W_enc, grad_b_enc, None, None


class DecoderGradient(torch.autograd.Function):
    """Identity on a decode ``recons = pairs.per_token(acts, W_dec)`` that was computed with ``W_dec``
    detached; backward adds ``W_dec``'s gradient as a per-latent sum (``embedding_bag``'s own backward
    to its table is slower on CPU; its backward to ``acts`` stays).
    """

    @staticmethod
    def forward(
        ctx: Any,
        recons: torch.Tensor,
        W_dec: torch.Tensor,  # noqa: ARG004 (an input, so that it receives its gradient)
        pairs: Pairs,
        acts: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(acts)
        ctx.pairs = pairs
        return recons.view_as(recons)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = grads
        (acts,) = ctx.saved_tensors
        grad_W_dec = ctx.pairs.per_latent(acts, grad) if ctx.needs_input_grad[1] else None
        return grad, grad_W_dec, None, None


def decode_pairs(pairs: Pairs, acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum of acts[i] * W_dec[cols[i]]`` over token t's pairs, differentiable in ``acts``
    and ``W_dec`` (:class:`DecoderGradient`). ``-> [n_tokens, d_in]``."""
    return DecoderGradient.apply(pairs.per_token(acts, W_dec.detach()), W_dec, pairs, acts.detach())


class SparseStep:
    """One sparse training step of ``sae``; see the module docstring.

    ``sae`` is one of this package's training SAEs: it provides ``encoder_scores(x)`` (raw scores,
    any memory layout), ``select_entries(hidden_pre)`` (the firing pairs) and
    ``aux_underuse(step_input)`` (aux weights and coefficient, or None).
    """

    def __init__(self, sae: Any, step_input: TrainStepInput):
        self.sae = sae
        self.step_input = step_input
        self.x, self.shift = self.encoder_input()
        self.norms = sae.W_dec.norm(dim=-1) if sae.cfg.rescale_acts_by_decoder_norm else None
        with torch.no_grad():
            self.raw = sae.encoder_scores(self.x)
            self.hidden_pre = self.raw if self.norms is None else self.raw * self.norms.detach()

    def encoder_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, shift)``: the encoder's input and what :class:`SelectedScores` differentiates it through.

        SAELens's ``process_sae_in`` subtracts ``b_dec * apply_b_dec_to_input`` last; the SAE has no
        hooks here (:meth:`~sae_mutual_choice.fast.base.FastStepMixin.sparse_step_applies`). So where
        ``sae_in`` needs no gradient, ``x`` is a constant minus that shift, whose gradient is a sum
        over latents; else ``x`` keeps its graph and the shift is a constant 0.
        """
        sae, sae_in = self.sae, self.step_input.sae_in
        x = sae.process_sae_in(sae_in)
        if sae_in.requires_grad:
            return x, x.new_zeros(())
        return x.detach(), sae.b_dec * sae.cfg.apply_b_dec_to_input

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> Pairs:
        """Selected pairs of this step's tokens and the SAE's latents; ``rows`` sorted."""
        return Pairs(rows, cols, self.x.shape[0], self.hidden_pre.shape[1])

    def scores_at(self, pairs: Pairs, raw: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden_pre`` at the pairs, with gradient (as the dense step's, decoder norms included);
        ``raw``: the raw scores at the pairs, where the caller has them."""
        sae, cols = self.sae, pairs.cols
        if raw is None:
            raw = self.raw[pairs.rows, cols]
        values = SelectedScores.apply(self.x, self.shift, sae.W_enc, sae.b_enc, pairs, raw)
        # index_select, not indexing: its backward is an index_add_ (indexing's accumulates more slowly).
        return values if self.norms is None else values * self.norms.index_select(0, cols)

    def decode(self, pairs: Pairs, acts: torch.Tensor) -> torch.Tensor:
        """``sum_j acts[t, j] * W_dec[j]`` per token, without ``b_dec``. ``-> [B, d_in]``."""
        if self.norms is not None:
            acts = acts * (1 / self.norms).index_select(0, pairs.cols)
        return decode_pairs(pairs, acts, self.sae.W_dec)

    def run(self) -> TrainStepOutput:
        sae, sae_in = self.sae, self.step_input.sae_in
        with torch.no_grad():
            entries: Entries = sae.select_entries(self.hidden_pre)
        pairs = self.pairs(entries.rows, entries.cols)
        acts = self.scores_at(pairs)
        if entries.fires is not None:  # a fixed-size selection: pairs that do not fire count 0
            acts = torch.where(entries.fires, acts, acts.new_zeros(()))
        recons = self.decode(pairs, acts) + sae.b_dec
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
        """The aux loss of :func:`~sae_mutual_choice.upstream.adaptive_allocation.aux_zipf_loss`, on the selected pairs only."""
        sae_in = self.step_input.sae_in
        selection = aux_selection(self.hidden_pre, underuse, sae_in.shape[-1])
        if selection is None:
            return sae_out.new_tensor(0.0)
        n_tokens, k_aux = selection.latents.shape
        rows = torch.arange(n_tokens, device=sae_in.device).repeat_interleave(k_aux)
        pairs = self.pairs(rows, selection.latents.reshape(-1))
        raw = self.raw.gather(1, selection.latents).reshape(-1)  # 4x faster than raw[rows, cols] here
        acts = self.scores_at(pairs, raw) * selection.weights.reshape(-1)
        recons = self.decode(pairs, acts)
        return aux_reconstruction_loss(recons, sae_in, sae_out, selection.scale, coefficient)
