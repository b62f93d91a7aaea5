import pytest
import torch
from helpers import step_input
from sae_lens import JumpReLUSAE

from sae_mutual_choice import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
)
from sae_mutual_choice.app.evaluate import at_k, counts_at_k, trained_k

D_IN, D_SAE, K = 16, 64, 4.0


def _exported(arch: str, tmp_path) -> JumpReLUSAE:
    torch.manual_seed(0)
    sae_class, config_class = {
        "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig),
        "feature_choice": (FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig),
    }[arch]
    sae = sae_class(config_class(d_in=D_IN, d_sae=D_SAE, k=K))
    for step in range(4):
        sae.training_forward_pass(
            step_input(torch.randn(64, D_IN, generator=torch.Generator().manual_seed(step)))
        )
    sae.save_inference_model(tmp_path)
    return JumpReLUSAE.load_from_disk(tmp_path)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_at_k_fires_exactly_k_per_token_on_the_evaluation_text(arch, tmp_path):
    exported = _exported(arch, tmp_path)
    assert trained_k(exported) == K
    x = 1.5 * torch.randn(500, D_IN, generator=torch.Generator().manual_seed(9))  # not the training scale
    with torch.no_grad():
        before = (exported.encode(x) > 0).sum(0)
        after = (at_k(exported, x, K).encode(x) > 0).sum(0)
    assert int(before.sum()) != int(K * 500)
    assert int(after.sum()) == int(K * 500)
    thresholds: torch.Tensor = at_k(exported, x, K).threshold  # type: ignore[assignment]
    if arch == "mutual_choice":
        assert torch.equal(thresholds, thresholds[0].expand(D_SAE))
    else:  # each latent keeps its share of the firing, to rounding
        expected = before.double() * (K * 500 / float(before.sum()))
        assert float((after.double() - expected).abs().max()) <= 1.0 + 1e-9
    assert not torch.equal(exported.threshold, thresholds)  # the original is untouched


def test_at_k_caps_each_latents_share_at_the_evaluation_tokens(tmp_path):
    # Asked for more pairs than the SAE fires: scaled-up shares would exceed the token count.
    exported = _exported("feature_choice", tmp_path)
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        exported.threshold.data[:] = 1e9
        exported.threshold.data[:2] = torch.tensor([-1.0, 0.0])  # latent 0 fires on every token
        exported.b_enc.data += 100.0  # every score positive, so any threshold can be met
    counts = counts_at_k(exported, x, 8.0)
    assert isinstance(counts, torch.Tensor)
    assert int(counts.sum()) == 400 and int(counts.max()) <= 50
    fired = at_k(exported, x, 8.0).encode(x) != 0
    assert int(fired.sum()) == 400
