import contextlib

import pytest
import torch

from sae_mutual_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig
from sae_mutual_choice.fast.host_reads import sync_free


def _concentrated_demand_sae() -> FeatureChoiceTrainingSAE:
    """Demand on 2 of 8 latents, no floor: with 4 tokens and k 4 (budget 16) those two can take 4
    tokens each and the other six must take the other 8."""
    sae = FeatureChoiceTrainingSAE(
        FeatureChoiceTrainingSAEConfig(d_in=6, d_sae=8, k=4.0, min_capacity_ratio=0.0, aux_loss="none")
    )
    with torch.no_grad():
        sae.latent_demand.copy_(torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0]))
        sae.latent_demand_weight.fill_(1.0)
        sae.b_enc.fill_(100.0)  # every score positive, so every selected pair fires
    return sae


@pytest.mark.parametrize("sync_free_path", [False, True])
def test_demand_on_too_few_latents_still_fires_the_whole_budget(sync_free_path):
    sae = _concentrated_demand_sae().eval()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with sync_free() if sync_free_path else contextlib.nullcontext():
        fired = sae.encode(x) != 0
    assert int(fired.sum()) == 16
    assert fired.sum(0).tolist() == [4, 4, 2, 2, 1, 1, 1, 1]


def test_calibration_counts_fill_the_budget_within_the_batch():
    counts = _concentrated_demand_sae().calibration_counts(4)
    assert int(counts.sum()) == 16 and int(counts.max()) == 4
