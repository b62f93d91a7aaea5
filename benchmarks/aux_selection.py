"""The aux loss's search for each token's best candidates: which way is fastest at which share.

``fast.aux_selection.aux_selection`` takes each token's ``d_in // 2`` best-scoring candidate latents (under-used,
or dead for AuxK). Knowing how many there are, it can search three ways (``aux_zipf.search_*``): copy
the candidates' columns and search those; mask the other latents to -inf in a copy of all columns and
search that; or, when every latent is a candidate, search all columns as they are. This prints, for each shape
and share of candidates, the median time of each (interleaved, ``--reps`` after a warm-up), the
evidence for ``aux_zipf.COLUMNS_SEARCH_SHARE``.

    python benchmarks/aux_selection.py [--reps 7] [--device cpu] [--shape B F K_AUX]
"""

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from sae_mutual_choice.fast.aux_selection import COLUMNS_SEARCH_SHARE, search_columns, search_unmasked
from sae_mutual_choice.upstream.adaptive_allocation import search_masked

# (B, F, d_in // 2): the demo's, and step_time.py's two CPU shapes.
SHAPES = [(2048, 2304, 288), (4096, 4608, 288), (4096, 16384, 384)]
SHARES = [0.3, 0.5, 0.7, 0.8, 0.9, 1.0]


def searches(scores: torch.Tensor, candidates: torch.Tensor, k_aux: int) -> dict[str, Callable[[], object]]:
    """``aux_zipf``'s searches for each token's ``k_aux`` best candidates (unmasked: only when all are)."""
    ways = {"columns": search_columns, "masked": search_masked}
    if bool(candidates.all()):
        ways["unmasked"] = search_unmasked
    return {name: partial(search, scores, candidates, k_aux) for name, search in ways.items()}


def median_ms(ways: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each way, interleaved repetition by repetition after a warm-up."""
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for rep in range(reps + 1):
        for name, search in ways.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            search()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                seconds[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("B", "F", "K_AUX"), help="one shape instead")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    print(f"aux candidate search on {device}; COLUMNS_SEARCH_SHARE = {COLUMNS_SEARCH_SHARE}")
    print("| B, F, k_aux | share of candidates | columns ms | masked ms | all columns, unmasked ms |")
    print("|---|---|---|---|---|")
    for n_tokens, n_latents, k_aux in [args.shape] if args.shape else SHAPES:
        scores = torch.randn(n_tokens, n_latents, generator=generator).to(device)
        for share in SHARES:
            candidates = (torch.rand(n_latents, generator=generator) < share).to(device)
            ms = median_ms(searches(scores, candidates, k_aux), args.reps, device)
            unmasked = f"{ms['unmasked']:.1f}" if "unmasked" in ms else "-"
            print(
                f"| {n_tokens}, {n_latents}, {k_aux} | {share:.1f} | {ms['columns']:.1f} | {ms['masked']:.1f} "
                f"| {unmasked} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
