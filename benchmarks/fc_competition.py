"""Issue 26's diagnosis: Feature Choice with a token-competitive ranking, on the synthetic benchmark.

Registers ``feature_choice_ranked`` (a diagnostic, not a shipped architecture): latent ``j`` still takes
its ``m_j`` best tokens and only positive scores fire, but "best" is ranked by a preference other than
the raw score. ``ranking``: ``"score"`` (Feature Choice as shipped), ``"margin"`` (score minus
``margin_weight`` times the token's (k+1)-th score, the cut a latent must beat in TopK; annealed linearly
to the raw score over ``anneal_steps`` training steps when > 0), ``"relative"`` (score over the token's
best score) or ``"softmax"`` (softmax over latents per token, as in expert-choice routing). Three more
knobs act on the *floor latents* (whose demand-proportional share is below the floor's, so the floor
sets their capacity) or on the demand: ``floor_ranking: "margin"`` ranks only their tokens by the margin;
``floor_learning: "aux"`` keeps their pairs in the reconstruction but stops the main loss's gradient to
them (encoder and decoder), so they learn from the aux loss alone, as AuxK's dead latents do;
``demand: "token_choice"`` measures demand as each latent's share of the batch's TopK selection (the
token's k best positive scores) instead of Mutual Choice's; ``floor: "max"`` makes the floor a minimum, each
latent's capacity ``max(floor, c * demand share)`` with ``c`` such that they sum to the budget, instead of
mixing ``min_capacity_ratio`` of the uniform share into every latent's (which takes the floor's tokens from
every latent, not only from those above it). The export is Feature Choice's (per-latent
thresholds on raw scores). Then runs ``synthetic.py`` with the arguments:

    python benchmarks/fc_competition.py --config configs/benchmarks/synthetic_fc_competition.yaml
"""

import runpy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from sae_lens.registry import register_sae_training_class
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_mutual_choice.upstream.adaptive_allocation import (
    batch_budget,
    debiased,
    fire,
    over_tokens,
    top_m_mask,
)
from sae_mutual_choice.upstream.feature_choice_sae import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    capacities_from_shares,
)


@dataclass
class RankedFeatureChoiceConfig(FeatureChoiceTrainingSAEConfig):
    ranking: str = "margin"
    margin_weight: float = 1.0
    anneal_steps: int = 0
    floor_ranking: str = "score"
    floor_learning: str = "main"
    demand: str = "mutual_choice"
    floor: str = "mix"

    @classmethod
    def architecture(cls) -> str:
        return "feature_choice_ranked"


class RankedFeatureChoiceSAE(FeatureChoiceTrainingSAE):
    cfg: RankedFeatureChoiceConfig  # type: ignore[assignment]
    step = 0

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self.step = step_input.n_training_steps
        return super().training_forward_pass(step_input)

    def preference(self, scores: torch.Tensor) -> torch.Tensor:
        """How much each latent wants each token, (batch_size, d_sae)."""
        if self.cfg.ranking == "margin":
            weight = self.cfg.margin_weight
            if self.cfg.anneal_steps:
                weight *= max(0.0, 1 - self.step / self.cfg.anneal_steps) if self.in_training_step else 0.0
            return scores - weight * self.cut(scores)
        if self.cfg.ranking == "relative":
            return scores / scores.max(dim=1, keepdim=True).values.clamp(min=1e-6)
        if self.cfg.ranking == "softmax":
            return torch.softmax(scores, dim=1)
        return scores

    def cut(self, scores: torch.Tensor) -> torch.Tensor:
        """Each token's (k+1)-th score, (batch_size, 1)."""
        return scores.topk(max(1, round(self.cfg.k)) + 1, dim=1).values[:, -1:]

    def floor_latents(self) -> torch.Tensor:
        """Latents whose demand-proportional share is below the floor's, (d_sae,) bool."""
        demand = debiased(self.latent_demand, self.latent_demand_weight)
        share = demand / demand.sum().clamp(min=torch.finfo(demand.dtype).tiny)
        ratio = self.cfg.min_capacity_ratio
        return (self.latent_demand_weight > 0) & ((1 - ratio) * share < ratio / self.cfg.d_sae)

    def capacities(self, n_tokens: int) -> torch.Tensor:
        if self.cfg.floor != "max" or self.cfg.capacity != "demand":
            return super().capacities(n_tokens)
        demand = debiased(self.latent_demand, self.latent_demand_weight).double()
        floor = self.cfg.min_capacity_ratio / demand.numel()
        shares = torch.full_like(demand, 1 / demand.numel())
        if float(demand.sum()) > 0:
            share = demand / demand.sum()
            # The latents at the floor: a fixed point, reached in a few rounds.
            at_floor = torch.zeros_like(share, dtype=torch.bool)
            for _ in range(50):
                scale = (1 - floor * at_floor.sum()) / share[~at_floor].sum()
                grown = at_floor | (share * scale < floor)
                if bool((grown == at_floor).all()):
                    break
                at_floor = grown
            shares = torch.where(at_floor, floor, share * scale)
        return capacities_from_shares(shares, batch_budget(self.cfg.k, n_tokens), n_tokens, 0.0)

    def demand_wins(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        if self.cfg.demand != "token_choice":
            return super().demand_wins(scores, budget)
        best = scores.topk(max(1, round(self.cfg.k)), dim=1).indices
        won = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best, True) & (scores > 0)
        return won.sum(0).float() * budget / max(1, int(won.sum()))

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.activate

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        def rule(s: torch.Tensor) -> torch.Tensor:
            capacities = self.batch_capacities(s)  # updates the demand the floor latents follow
            preference = self.preference(s)
            if self.cfg.floor_ranking == "margin" and self.in_training_step:
                preference = torch.where(self.floor_latents(), s - self.cut(s), preference)
            acts = fire(s, top_m_mask(preference, capacities, dim=0))
            if self.cfg.floor_learning == "aux" and self.in_training_step:
                acts = torch.where(self.floor_latents(), acts.detach(), acts)
            return acts

        return over_tokens(rule)(scores)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        if self.cfg.floor_learning != "aux" or not self.in_training_step:
            return super().decode(feature_acts)
        # The demand is as activate() left it, so these are the floor latents it detached.
        W_dec = torch.where(self.floor_latents()[:, None], self.W_dec.detach(), self.W_dec)
        out = act_times_W_dec(feature_acts, W_dec, self.cfg.rescale_acts_by_decoder_norm) + self.b_dec
        out = self.run_time_activation_norm_fn_out(self.hook_sae_recons(out))
        return self.reshape_fn_out(out, self.d_head)


register_sae_training_class("feature_choice_ranked", RankedFeatureChoiceSAE, RankedFeatureChoiceConfig)

if __name__ == "__main__":
    synthetic = Path(__file__).with_name("synthetic.py")
    sys.argv = [str(synthetic), *sys.argv[1:]]
    runpy.run_path(str(synthetic), run_name="__main__")
