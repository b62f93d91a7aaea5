"""The config fields of the fast and distributed layer, and their validation.

Every field is JSON-serialisable, so SAELens's ``to_dict`` / ``from_dict`` round trip keeps it.
Errors name the field and its allowed range.
"""

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(kw_only=True)
class FastFields:
    """Fields of the training SAEs here on top of their SAELens-shaped configs.

    Args:
        sparse_training: ``True``: the sparse step (only the selected pairs go past the encoder
            matmul; see :mod:`sae_mutual_choice.fast.sparse_step`). ``False``: SAELens's dense step, the
            reference. Both give the same losses and gradients. ``"auto"`` (default): whichever
            the benchmarks show to be faster on the step's device (:func:`sparse_step_is_faster`).
        data_parallel: each rank of the default ``torch.distributed`` process group trains on one
            slice of the batch, and selection and running statistics are those of the joined batch
            (all ranks' slices in rank order), exactly; gradients must be averaged over ranks (DDP).
            Without a process group it changes nothing. docs/method.md, "Data-parallel training".
    """

    sparse_training: bool | Literal["auto"] = "auto"
    data_parallel: bool = False

    def __post_init__(self) -> None:
        # First in the bases of each config here: the upstream config validates its own fields first.
        super().__post_init__()  # type: ignore[misc]
        if not isinstance(self.data_parallel, bool):
            raise ValueError(f"data_parallel must be true or false, got {self.data_parallel!r}")
        if not isinstance(self.sparse_training, bool) and self.sparse_training != "auto":
            raise ValueError(f"sparse_training must be true, false or 'auto', got {self.sparse_training!r}")


def sparse_step_is_faster(device: torch.device) -> bool:
    """``sparse_training="auto"``'s rule: the sparse step on CPU, SAELens's dense step elsewhere.

    On CPU the sparse step took 0.23-0.39x SAELens topk's step time at both benchmarked shapes
    (docs/performance.md); no other device has been measured yet, and there the dense step, SAELens's
    own, is the one no user can be slower than. ``benchmarks/gpu.sh`` gives the CUDA figures to revise it.
    """
    return device.type == "cpu"
