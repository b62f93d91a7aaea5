"""Whether a training step may read device values on the host.

Reading a tensor's value (``int(t)``, ``nonzero``, a boolean-mask index…) makes the host wait for
the device: on an accelerator that stalls its queue every time, on CPU it costs nothing. Where a
host read buys a shortcut (searching only the few under-used latents' columns, an immediate
NaN check), the step takes it on CPU only; elsewhere it takes a fixed-size path with the same
result. :func:`sync_free` forces the accelerator's path on CPU, for the tests and the sync counter
(``benchmarks/syncs.py``).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_forced = 0


def host_reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading values of ``tensor`` on the host costs nothing (on CPU, unless :func:`sync_free` is on)."""
    return tensor.device.type == "cpu" and _forced == 0


@contextmanager
def sync_free() -> Iterator[None]:
    """Within this block, steps take the accelerator's path (no host reads) on CPU too."""
    global _forced
    _forced += 1
    try:
        yield
    finally:
        _forced -= 1
