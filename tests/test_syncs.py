"""Host-device synchronisations of a steady-state training step, on the path an accelerator takes.

Counted on CPU under :func:`~sae_mutual_choice.fast.host_reads.sync_free` by ``benchmarks/syncs.py``'s
dispatch-mode counter (value reads, ``nonzero``, boolean-mask indexing, ``unique``, ...) over steps
3-5; with CUDA, also by ``torch.cuda.set_sync_debug_mode("error")``.
"""

import contextlib
import importlib
import sys
from pathlib import Path

import pytest
import torch
from helpers import step_input

from sae_mutual_choice.fast.base import NONFINITE_CHECK_INTERVAL
from sae_mutual_choice.fast.host_reads import sync_free

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
syncs = importlib.import_module("syncs")

CASES = [
    (architecture, sparse, aux)
    for architecture in ("token_choice", "mutual_choice", "feature_choice")
    for sparse in (True, False)
    for aux in ("aux_k", "aux_zipf")
]


@pytest.mark.parametrize(("architecture", "sparse", "aux"), CASES)
def test_the_aux_loss_and_the_running_statistics_add_no_sync(architecture, sparse, aux):
    """Whatever the selection costs, the aux term (dead or under-used latents, the Zipf fit), the
    input check and the running statistics add nothing: the step syncs as often as without an aux loss."""
    with_aux = syncs.count_syncs(architecture, sparse, aux, batch=256)
    without = syncs.count_syncs(architecture, sparse, "none", batch=256)
    assert with_aux == without


def test_nonfinite_inputs_are_refused_at_the_next_read_of_the_record(tmp_path):
    """Without free host reads a NaN batch is recorded on the device, and refused (naming its step)
    at the next logging step, check interval or save; never silently trained on."""

    sae = syncs.training_sae("mutual_choice", sparse=True, aux="aux_k")
    x = torch.randn(64, sae.cfg.d_in)
    bad = x.clone()
    bad[3, 1] = torch.nan
    with sync_free():
        sae.training_forward_pass(step_input(x, step=0))
        sae.training_forward_pass(step_input(bad, step=7))  # recorded, not read yet
        sae.training_forward_pass(step_input(x, step=8))
        with pytest.raises(ValueError, match=r"NaN or infinite values \(first at training step 7\)"):
            sae.training_forward_pass(step_input(x, step=NONFINITE_CHECK_INTERVAL))
        with pytest.raises(ValueError, match="first at training step 7"):
            sae.save_model(tmp_path / "checkpoint")
        assert not list((tmp_path / "checkpoint").glob("*.safetensors"))
        fresh = syncs.training_sae("mutual_choice", sparse=True, aux="aux_k")
        with pytest.raises(ValueError, match="first at training step 5"):  # a logging step reads at once
            fresh.training_forward_pass(step_input(bad, step=5, logging=True))


# Where the step is at SAELens topk's count (its one sync: the number of dead latents, read for AuxK):
# all but Feature Choice's dense step (its per-latent top-m reads the largest capacity).
AT_TARGET = [case for case in CASES if case[:2] != ("feature_choice", False)]


@pytest.mark.parametrize(("architecture", "sparse", "aux"), AT_TARGET)
def test_no_more_syncs_than_saelens_topk(architecture, sparse, aux):
    topk = sum(syncs.count_syncs("topk", True, "aux_k", batch=256).values())
    assert sum(syncs.count_syncs(architecture, sparse, aux, batch=256).values()) <= topk


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("architecture", "sparse", "aux"), AT_TARGET)
def test_no_more_syncs_than_saelens_topk_on_cuda(architecture, sparse, aux):
    """As counted by CUDA's sync debug mode, steps 3-10."""
    topk = syncs.count_syncs("topk", True, "aux_k", batch=512, steps=10, device="cuda")
    ours = syncs.count_syncs(architecture, sparse, aux, batch=512, steps=10, device="cuda")
    assert ours["cuda (debug mode)"] <= topk["cuda (debug mode)"]


@pytest.mark.parametrize(
    ("architecture", "sparse", "aux"), [*CASES, ("feature_choice:zipf", True, "aux_zipf")]
)
def test_the_sync_free_path_trains_as_the_host_read_path(architecture, sparse, aux):
    """Five Adam steps (with dead and under-used latents) from the same start: the same losses and
    weights whether the step may read values on the host or not (``ARCH:CAPACITY`` for Feature Choice)."""
    architecture, _, capacity = architecture.partition(":")
    saes = []
    for forced in (False, True):
        torch.manual_seed(0)
        sae = syncs.training_sae(architecture, sparse, aux, **({"capacity": capacity} if capacity else {}))
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
        dead = torch.arange(sae.cfg.d_sae) % 20 == 0
        losses = []
        for step in range(5):
            x = torch.randn(128, sae.cfg.d_in, generator=torch.Generator().manual_seed(step))
            with sync_free() if forced else contextlib.nullcontext():
                out = sae.training_forward_pass(step_input(x, dead, {"aux_loss": 1.0}, step=step))
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append({name: float(value.detach()) for name, value in out.losses.items()})
        saes.append((sae, losses))
    (reference, reference_losses), (sae, losses) = saes
    for step, (ours, theirs) in enumerate(zip(losses, reference_losses, strict=True)):
        assert ours.keys() == theirs.keys()
        for name, value in theirs.items():
            assert ours[name] == pytest.approx(value, rel=1e-6), f"step {step}: {name}"
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], value, equal_nan=True, msg=name)
