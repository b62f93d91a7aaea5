"""Host-device synchronisations per steady-state training step, counted on CPU.

A ``TorchDispatchMode`` records the operators that make the host wait for a CUDA device: reading a
tensor's value (``.item()``, ``float()``, ``int()``, ``bool()``: ``aten._local_scalar_dense``),
outputs whose size depends on values (``nonzero``, ``masked_select``, ``unique``, boolean-mask
indexing, ``repeat_interleave`` without ``output_size``, ``bincount`` without ``minlength``). On CPU
nothing waits, but the same operators run, so the count is the one a CUDA step would make
(``.tolist()`` of a CPU tensor bypasses the dispatcher and is not seen). One step is SAELens's
``training_forward_pass`` + backward (Adam runs between steps, uncounted: on CUDA its step counters
live on the host), B tokens, a few dead latents; the figure is the mean over steps 3–5.

    python benchmarks/syncs.py [--batch 512]

Prints one row per architecture, step and aux loss, with the operators that were counted.
"""

import argparse
from collections import Counter
from typing import Any

import torch
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from torch.utils._python_dispatch import TorchDispatchMode

import sae_mutual_choice  # noqa: F401  (registers the architectures)

ALWAYS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class SyncCounter(TorchDispatchMode):
    """Counts the operators (by name) that synchronise the host with a CUDA device."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name.removeprefix("aten::")
        if (
            name in ALWAYS
            or (name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3)
            or (name == "bincount" and not kwargs.get("minlength", args[2] if len(args) > 2 else 0))
        ):
            self.counts[name] += 1
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in (args[1] or [])
        ):
            self.counts[f"{name} (boolean mask)"] += 1
        return func(*args, **kwargs)


def count_syncs(architecture: str, sparse: bool, aux: str, batch: int, steps: int = 5) -> Counter[str]:
    """The sync operators of steps 3.. of ``steps`` (summed), for one configuration."""
    sae_class, config_class = get_sae_training_class(architecture)
    fields: dict[str, Any] = {
        "d_in": 64,
        "d_sae": 1024,
        "k": 16 if architecture in ("topk", "token_choice") else 16.0,
    }
    if architecture in ("token_choice", "mutual_choice", "feature_choice"):
        fields.update(sparse_training=sparse, aux_loss=aux)
    torch.manual_seed(0)
    sae = sae_class(config_class(**fields))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    dead = torch.arange(fields["d_sae"]) % 20 == 0
    total: Counter[str] = Counter()
    for step in range(steps):
        x = torch.randn(batch, fields["d_in"])
        counter = SyncCounter()
        with counter:
            out = sae.training_forward_pass(TrainStepInput(x, {"aux_loss": 1.0}, dead, step, False))
            out.loss.backward()
        optimizer.step()  # not counted: on CUDA, Adam's step counters live on the host
        optimizer.zero_grad()
        if step >= 2:
            total += counter.counts
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    rows = [("topk", True, "aux_k"), ("batchtopk", True, "aux_k")]
    rows += [
        (architecture, sparse, aux)
        for architecture in ("token_choice", "mutual_choice", "feature_choice")
        for sparse in (True, False)
        for aux in ("aux_k", "aux_zipf")
    ]
    print(f"B = {args.batch}, steps 3-5\n")
    print("| architecture | step | aux loss | syncs per step | operators (over 3 steps) |")
    print("|---|---|---|---|---|")
    for architecture, sparse, aux in rows:
        counts = count_syncs(architecture, sparse, aux, args.batch)
        ours = architecture in ("token_choice", "mutual_choice", "feature_choice")
        step = ("sparse" if sparse else "dense") if ours else "SAELens"
        detail = ", ".join(f"{name} {n}" for name, n in counts.most_common())
        print(
            f"| {architecture} | {step} | {aux if ours else '—'} | {sum(counts.values()) / 3:.1f} | {detail} |"
        )


if __name__ == "__main__":
    main()
