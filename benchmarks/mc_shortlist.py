"""Mutual Choice's candidate cut on real activations: how wide each row's shortlist should be.

``selection.mutual_choice_entries`` shortlists each row's best scores, takes the budget-th largest of
the shortlists as a cut, and sorts every pair at or above it. With one even share of the budget per
row, rows that hold far more than their share (large-norm tokens, frequent latents) pull the cut
down and let many pairs through. For shortlists of 1, 2, 4 and 8 shares (the module's choice: 4) this
prints, side by side in one run, the candidates per budget pair and the selection's time, in both
layouts (rows = tokens, or latents as Feature Choice stores its scores), on the activations of the
config's model and hook (the demo's: SmolLM2, layer 6) and on Gaussian inputs of the same median norm.

    python benchmarks/mc_shortlist.py [--sae PATH] [--tokens 2048] [--k 32] [--reps 5] [--steps 10]

``--sae``: a saved SAE whose encoder scores the inputs (e.g. the demo's results/demo/saes/feature_choice);
by default a freshly initialised one of the config's width. ``--steps N``: then N training steps
(``step_time.py``'s: forward, backward, Adam; aux_zipf) of Mutual and Feature Choice SAEs on the
activations, with one and with four shares, interleaved step by step; the median over steps after
the second. The SAEs start from ``--sae``'s weights (on the raw activations, which its export
expects), else new (on the activations scaled to mean norm sqrt(d_in), as the demo's
``normalize_activations`` does).
"""

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.registry import get_sae_training_class
from step_time import build, step

from sae_mutual_choice import selection
from sae_mutual_choice.cli import demo_config
from sae_mutual_choice.compare import CompareSpec, load_any_model
from sae_mutual_choice.embedded import embedded_dataset
from sae_mutual_choice.evaluate import token_activations
from sae_mutual_choice.yaml_config import read_yaml

SHARES = [1, 2, 4, 8]


def encoder(path: Path | None, d_in: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_enc, b_enc)`` of the SAE at ``path``, or of a new mutual_choice training SAE."""
    sae: Any
    if path is not None:
        sae = SAE.load_from_disk(path, device="cpu")
    else:
        sae_class, config_class = get_sae_training_class("mutual_choice")
        sae = sae_class(config_class(**{"d_in": d_in, "d_sae": d_sae, "k": 32.0}))
    return sae.W_enc.detach(), sae.b_enc.detach()


def timed(
    scores: torch.Tensor, rows: torch.Tensor, budget: int, shares: int, reps: int
) -> tuple[float, float]:
    """(candidates per budget pair, median seconds) of the selection with ``shares`` shares per row;
    ``rows``: the contiguous view of ``scores`` whose rows are shortlisted."""
    selection.SHORTLIST_OVER_ROW_SHARE = shares
    cut = selection.candidate_cut(rows, budget)
    candidates = int(((scores >= cut) & (scores > 0)).sum()) / budget
    seconds = []
    for _ in range(reps + 1):  # the first is a warm-up
        start = time.perf_counter()
        selection.mutual_choice_entries(scores, budget)
        seconds.append(time.perf_counter() - start)
    return candidates, statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description="Mutual Choice's candidate cut on real activations.")
    parser.add_argument("--config", type=Path, default=demo_config())
    parser.add_argument("--sae", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0)
    args = parser.parse_args()
    spec = CompareSpec.from_dict(read_yaml(args.config, []))
    context = spec.setting("context_size")
    model = load_any_model(spec.setting("model_name"), context, "cpu")
    rows = embedded_dataset(spec.setting("dataset_path"), model, context, "train")["input_ids"]
    n_rows = -(-2 * args.tokens // context)  # enough rows for the tokens left after special ones
    x = token_activations(model, torch.tensor(rows[:n_rows]), spec.hook)[: args.tokens]
    d_sae = next(iter(spec.saes.values())).d_sae
    W_enc, b_enc = encoder(args.sae, x.shape[1], d_sae)
    gaussian = torch.randn_like(x) * x.norm(dim=1).median() / x.shape[1] ** 0.5
    budget = args.k * x.shape[0]
    norms = x.norm(dim=1)
    print(
        f"{x.shape[0]} tokens of {spec.setting('model_name')} at {spec.hook} (norm p99 / median "
        f"{float(norms.quantile(0.99) / norms.median()):.1f}), width {d_sae}, k {args.k}, "
        f"{args.sae or 'a new SAE'}; {torch.get_num_threads()} CPU threads\n"
    )
    print("| inputs | rows | shares per row | candidates / budget | selection ms |")
    print("|---|---|---|---|---|")
    for name, inputs in (("activations", x), ("Gaussian", gaussian)):
        token_major = inputs @ W_enc + b_enc
        latent_major = W_enc.t() @ inputs.t() + b_enc[:, None]  # [F, B], as Feature Choice stores scores
        for layout, scores, rows in (
            ("tokens", token_major, token_major),
            ("latents", latent_major.t(), latent_major),
        ):
            for shares in SHARES:
                candidates, seconds = timed(scores, rows, budget, shares, args.reps)
                print(f"| {name} | {layout} | {shares} | {candidates:.2f} | {1e3 * seconds:.1f} |")
    if args.steps:
        if args.sae is None:
            x = x * x.shape[1] ** 0.5 / x.norm(dim=1).mean()
        initial = SAE.load_from_disk(args.sae, device="cpu").state_dict() if args.sae else None
        print(training_steps(x, d_sae, args.k, args.steps, initial))


def training_steps(x: torch.Tensor, d_sae: int, k: int, steps: int, initial: dict[str, Any] | None) -> str:
    """A table of median training-step times with one and four shares per row (see the docstring);
    ``initial``: the SAEs' first ``W_enc``, ``b_enc``, ``W_dec`` and ``b_dec``, else new ones."""
    torch.manual_seed(0)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    runs = {
        (name, shares): build(name, x.shape[1], d_sae, k)
        for name in ("mutual_choice", "feature_choice")
        for shares in (1, 4)
    }
    if initial is not None:
        for sae in runs.values():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).data.copy_(initial[name])
    optimizers = {key: torch.optim.Adam(sae.parameters(), lr=4e-4) for key, sae in runs.items()}
    seconds: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for _ in range(steps):
        for (name, shares), sae in runs.items():
            selection.SHORTLIST_OVER_ROW_SHARE = shares
            start = time.perf_counter()
            step(sae, optimizers[(name, shares)], x, dead)
            seconds[(name, shares)].append(time.perf_counter() - start)
    lines = ["", "| architecture | step ms, 1 share | step ms, 4 shares |", "|---|---|---|"]
    for name in ("mutual_choice", "feature_choice"):
        one, four = (1e3 * statistics.median(seconds[(name, n)][2:]) for n in (1, 4))
        lines.append(f"| {name} | {one:.1f} | {four:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
