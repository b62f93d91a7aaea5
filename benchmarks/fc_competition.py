"""Issue 26's diagnosis: Feature Choice with a token-competitive ranking, on the synthetic benchmark.

Registers ``feature_choice_ranked`` (a diagnostic, not a shipped architecture): latent ``j`` still takes
its ``m_j`` best tokens and only positive scores fire, but "best" is ranked by a preference other than
the raw score. ``ranking``: ``"score"`` (Feature Choice as shipped), ``"margin"`` (score minus
``margin_weight`` times the token's (k+1)-th score, the cut a latent must beat in TopK; annealed linearly
to the raw score over ``anneal_steps`` training steps when > 0), ``"relative"`` (score over the token's
best score) or ``"softmax"`` (softmax over latents per token, as in expert-choice routing). The export
is Feature Choice's (per-latent thresholds on raw scores). Then runs ``synthetic.py`` with the arguments:

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

from sae_mutual_choice.upstream.adaptive_allocation import fire, over_tokens, top_m_mask
from sae_mutual_choice.upstream.feature_choice_sae import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
)


@dataclass
class RankedFeatureChoiceConfig(FeatureChoiceTrainingSAEConfig):
    ranking: str = "margin"
    margin_weight: float = 1.0
    anneal_steps: int = 0

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
            cut = scores.topk(max(1, round(self.cfg.k)) + 1, dim=1).values[:, -1:]
            return scores - weight * cut
        if self.cfg.ranking == "relative":
            return scores / scores.max(dim=1, keepdim=True).values.clamp(min=1e-6)
        if self.cfg.ranking == "softmax":
            return torch.softmax(scores, dim=1)
        return scores

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.activate

    def activate(self, scores: torch.Tensor) -> torch.Tensor:
        def rule(s: torch.Tensor) -> torch.Tensor:
            return fire(s, top_m_mask(self.preference(s), self.batch_capacities(s), dim=0))

        return over_tokens(rule)(scores)


register_sae_training_class("feature_choice_ranked", RankedFeatureChoiceSAE, RankedFeatureChoiceConfig)

if __name__ == "__main__":
    synthetic = Path(__file__).with_name("synthetic.py")
    sys.argv = [str(synthetic), *sys.argv[1:]]
    runpy.run_path(str(synthetic), run_name="__main__")
