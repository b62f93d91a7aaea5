"""The sparse step's decode (forward and backward) as today's ``embedding_bag`` against a fused kernel.

Today the sparse step decodes its selected pairs with ``sparse_step.decode_pairs`` (``embedding_bag``
with per-pair weights, and the decoder's gradient as a per-latent ``embedding_bag``), which builds
no ``[pairs, d_in]`` tensor. The candidate is the plain
formulation ``zeros.index_add(0, rows, acts[:, None] * W_dec[cols])`` compiled by
``torch.compile`` (inductor: C++ on CPU, Triton on CUDA), which fuses the gather, the product and
the scatter. Each runs forward and backward (gradients to the activations and the decoder) on the
same pairs, one after another; also timed: the eager uncompiled formulation, as a floor, and
``embedding_bag`` with its own backward to the decoder (the step's decode before 0.4.3). Prints the
best time of ``--reps`` for each and whether their outputs and gradients agree (relative error 1e-4).

    python benchmarks/fused_pairs.py [--device cuda] [--shape B D_IN WIDTH K]
"""

import argparse
import time
from collections.abc import Callable

import torch

from sae_mutual_choice.fast.sparse_step import Pairs, bag_sum, decode_pairs

Decode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def todays_decode(
    rows: torch.Tensor, cols: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor, n_tokens: int
) -> torch.Tensor:
    """The sparse step's decode of the pairs."""
    return decode_pairs(Pairs(rows, cols, n_tokens, W_dec.shape[0]), acts, W_dec)


def index_add_decode(
    rows: torch.Tensor, cols: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor, n_tokens: int
) -> torch.Tensor:
    """``out[t] = sum over pairs (t, j) of acts * W_dec[j]``, as a gather, a product and a scatter."""
    return W_dec.new_zeros(n_tokens, W_dec.shape[1]).index_add(0, rows, acts[:, None] * W_dec[cols])


def timed(
    decode: Decode, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor, reps: int
) -> tuple[float, list]:
    """Best time of ``reps`` forward + backward passes, and the output and gradients of the last."""
    rows, cols, acts, W_dec = inputs
    best, results = float("inf"), []
    for rep in range(reps + 1):  # the first is a warm-up (and compiles)
        acts.grad = W_dec.grad = None
        synchronize(acts.device)
        start = time.perf_counter()
        out = decode(rows, cols, acts, W_dec, grad.shape[0])
        out.backward(grad)
        synchronize(acts.device)
        if rep:
            best = min(best, time.perf_counter() - start)
        results = [out.detach(), acts.grad, W_dec.grad]
    return best, results


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--shape", type=int, nargs=4, default=[4096, 576, 4608, 32], metavar=("B", "D_IN", "WIDTH", "K")
    )
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    n_tokens, d_in, width, k = args.shape
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(n_tokens).repeat_interleave(k).to(device)  # sorted by token, as the step's are
    cols = torch.randint(0, width, (n_tokens * k,), generator=generator).to(device)
    acts = torch.rand(n_tokens * k, generator=generator).to(device).requires_grad_()
    W_dec = torch.randn(width, d_in, generator=generator).to(device).requires_grad_()
    grad = torch.randn(n_tokens, d_in, generator=generator).to(device)
    inputs = (rows, cols, acts, W_dec)
    reference_time, reference = timed(todays_decode, inputs, grad, args.reps)
    print(f"decode of {n_tokens * k:,} pairs, B {n_tokens}, d_in {d_in}, width {width}, on {device}")
    print(f"embedding_bag (today): {reference_time * 1e3:.2f} ms forward + backward")
    candidates = {
        "embedding_bag, its own backward to W_dec (before 0.4.3)": bag_sum,
        "index_add, eager": index_add_decode,
        "index_add, torch.compile": torch.compile(index_add_decode),
    }
    for name, decode in candidates.items():
        seconds, results = timed(decode, inputs, grad, args.reps)
        same = all(
            torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
            for a, b in zip(results, reference, strict=True)
        )
        print(
            f"{name}: {seconds * 1e3:.2f} ms ({seconds / reference_time:.2f}x today's), same results: {same}"
        )


if __name__ == "__main__":
    main()
