"""The export's calibration sample over data-parallel ranks.

Data-parallel training keeps the calibration sample per rank (each rank keeps the keys of its
slice of the joined batch, :meth:`~sae_mutual_choice.fast.base.FastStepMixin.sample_keys`).
:func:`calibrate_over_ranks` joins them before a save. The sample and the calibration themselves
are in :mod:`sae_mutual_choice.upstream.mutual_choice_sae`.
"""

import torch

from sae_mutual_choice.fast.collectives import gather_over_ranks
from sae_mutual_choice.upstream.mutual_choice_sae import (
    MutualChoiceTrainingSAE,
    sample_by_key,
    sample_thresholds,
)


@torch.no_grad()
def calibrate_over_ranks(sae: MutualChoiceTrainingSAE) -> None:
    """Pin, on every rank, the thresholds that the joined run's calibration sample gives (a collective).

    This gathers the ranks' samples, keeps the ``calibration_sample_size()`` inputs with the
    largest keys (the sample a single process would hold after training on the joined batches) and
    pins the thresholds computed on it, as ``calibrate_thresholds`` does, until the next training
    step. Call it on every rank before rank 0 saves a checkpoint or the inference model. Sends
    ``N x d_in`` values.
    """
    capacity = sae.calibration_sample_size()
    sae.allocate_calibration_sample()  # a rank that took no step gathers an empty sample of the same size
    keys = gather_over_ranks(sae.calibration_keys).reshape(-1)
    if capacity == 0 or not bool(torch.isfinite(keys).any()):
        return
    inputs = gather_over_ranks(sae.calibration_inputs).reshape(-1, sae.cfg.d_in)
    norms = gather_over_ranks(sae.calibration_norms).reshape(-1)
    totals = gather_over_ranks(sae.input_norm_totals).reshape(-1, 2).sum(0)
    kept = keys.topk(capacity).indices
    sample, sample_norms = sample_by_key(keys[kept], inputs[kept]), sample_by_key(keys[kept], norms[kept])
    sae.set_inference_thresholds(sample_thresholds(sae, sample, sample_norms, totals))
