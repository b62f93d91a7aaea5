"""Data-parallel training's cost: the bytes each rank sends per step, and the N-rank / 1-rank step time.

For each (B, F, k), B the joined batch, and each architecture, N ranks (gloo on this CPU, one thread
each) take training steps with ``data_parallel`` on their B/N-token slices: forward, backward, the
gradient all-reduce DDP would do, Adam. The collectives of :mod:`sae_mutual_choice.fast.collectives` are
wrapped to count what each rank contributes to them per step (the *payload*: the tensor it passes
in; a ring all-gather then sends (N-1) times that, a ring all-reduce 2(N-1)/N times), apart from the
gradients' all-reduce (2·d_in·F + F + d_in floats, the same for every architecture). The same
steps on one process over the joined batch (one thread) give the 1-rank step time; medians over
the measured steps; the time spent inside the wrapped collectives (waiting for the slower rank
included) is shown beside the step. Nothing here depends on a GPU: the byte counts hold on any device, the times
are this CPU's.

    python benchmarks/distributed.py [--quick] [--ranks 2] [--steps 6]

The full run writes docs/results/distributed.json; docs/scale.md reads it.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_mutual_choice import ARCHITECTURES
from sae_mutual_choice.fast import collectives
from sae_mutual_choice.upstream.adaptive_allocation import batch_budget

RESULTS_JSON = Path(__file__).parent.parent / "docs" / "results" / "distributed.json"
D_IN = 64
FULL = [(2048, 4096, 32), (4096, 4096, 32), (2048, 8192, 32), (2048, 4096, 64)]
QUICK = [(256, 512, 8)]
WARM_UP = 2


class CountingDist:
    """``torch.distributed`` with the payloads of ``all_reduce`` and ``all_gather`` counted, and their time."""

    def __init__(self) -> None:
        self.payload = 0
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(dist, name)

    def _count(self, tensor: torch.Tensor, call: Any) -> Any:
        self.payload += tensor.numel() * tensor.element_size()
        start = time.perf_counter()
        result = call()
        self.seconds += time.perf_counter() - start
        return result

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._count(tensor, lambda: dist.all_reduce(tensor, *args, **kwargs))

    def all_gather(self, pieces: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._count(tensor, lambda: dist.all_gather(pieces, tensor, *args, **kwargs))


def build(architecture: str, d_sae: int, k: int, data_parallel: bool) -> Any:
    sae_class, config_class = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    return sae_class(
        config_class(
            d_in=D_IN,
            d_sae=d_sae,
            k=k if architecture == "token_choice" else float(k),
            data_parallel=data_parallel,
            aux_loss="aux_zipf",
        )
    )


def train_steps(sae: Any, batches: torch.Tensor, n_ranks: int) -> list[float]:
    """Seconds of each step after warm-up: forward, backward, gradient average over ranks, Adam."""
    from sae_lens.saes.sae import TrainStepInput

    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    times = []
    for batch in batches:
        if n_ranks > 1:
            dist.barrier()
        start = time.perf_counter()
        out = sae.training_forward_pass(TrainStepInput(batch, {"aux_loss": 1.0}, None, 0, False))
        out.loss.backward()
        if n_ranks > 1:
            for param in sae.parameters():
                dist.all_reduce(param.grad)
                param.grad /= n_ranks
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times[WARM_UP:]


def joined_batches(n_tokens: int, steps: int) -> torch.Tensor:
    return torch.randn(steps, n_tokens, D_IN, generator=torch.Generator().manual_seed(1))


def run_rank(
    rank: int, n_ranks: int, grid: list[tuple[int, int, int]], steps: int, store: str, out: str
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=n_ranks)
    counting = CountingDist()
    collectives.dist = counting  # type: ignore[assignment]
    rows = []
    for n_tokens, d_sae, k in grid:
        for architecture in ARCHITECTURES:
            sae = build(architecture, d_sae, k, data_parallel=True)
            mine = joined_batches(n_tokens, steps).view(steps, n_ranks, -1, D_IN)[:, rank]
            counting.payload, counting.seconds = 0, 0.0
            times = train_steps(sae, mine, n_ranks)
            rows.append(
                {
                    "B": n_tokens,
                    "F": d_sae,
                    "k": k,
                    "architecture": architecture,
                    "payload_bytes_per_step": counting.payload / steps,
                    "collective_s_per_step": counting.seconds / steps,
                    "step_s": statistics.median(times),
                }
            )
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny setting (a smoke run)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps per setting, the first 2 not timed")
    args = parser.parse_args()
    grid = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    alone = {}
    for n_tokens, d_sae, k in grid:
        for architecture in ARCHITECTURES:
            sae = build(architecture, d_sae, k, data_parallel=False)
            times = train_steps(sae, joined_batches(n_tokens, args.steps), 1)
            alone[(n_tokens, d_sae, k, architecture)] = statistics.median(times)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        mp.spawn(
            run_rank, args=(args.ranks, grid, args.steps, str(Path(tmp) / "store"), out), nprocs=args.ranks
        )
        rows = json.loads(Path(out).read_text())
    for row in rows:
        row["ranks"] = args.ranks
        row["alone_step_s"] = alone[(row["B"], row["F"], row["k"], row["architecture"])]
        row["budget"] = batch_budget(row["k"], row["B"])
        row["gradient_bytes_per_step"] = 4 * (2 * D_IN * row["F"] + row["F"] + D_IN)
    print(render(rows))
    if not args.quick:
        RESULTS_JSON.write_text(json.dumps({"d_in": D_IN, "rows": rows}, indent=1))
        print(f"written: {RESULTS_JSON}", file=sys.stderr)


def render(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the rows."""
    lines = [
        "| B, F, k | architecture | payload per rank per step | / (k·B·4 B) | gradients (DDP) | "
        "1-rank step ms | N-rank step ms | of which selection collectives | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        payload = row["payload_bytes_per_step"]
        lines.append(
            f"| {row['B']}, {row['F']}, {row['k']} | {row['architecture']} | {payload / 1e3:.1f} kB | "
            f"{payload / (4 * row['budget']):.2f} | {row['gradient_bytes_per_step'] / 1e6:.2f} MB | "
            f"{1e3 * row['alone_step_s']:.1f} | {1e3 * row['step_s']:.1f} | "
            f"{1e3 * row['collective_s_per_step']:.1f} | {row['alone_step_s'] / row['step_s']:.2f}× ({row['ranks']} ranks) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
