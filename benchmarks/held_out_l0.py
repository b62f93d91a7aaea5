"""Exported L0 / k of saved SAEs over the whole held-out split, and its spread between 16,384-token chunks.

An exported Mutual or Feature Choice SAE is calibrated on a sample of 16,384 training inputs; this
measures how far its L0 on held-out text is from k, and how much of that a 16,384-token evaluation
(the demo's) can see: the standard deviation of L0 / k between consecutive 16,384-token chunks.

    python benchmarks/held_out_l0.py COMPARE_CONFIG SAE_DIR... [--batches N]
    python benchmarks/held_out_l0.py sae_mutual_choice/configs/demo.yaml results/demo/saes/*   # after sae-mc demo
"""

import argparse
from pathlib import Path

import torch
from sae_lens import SAE

from sae_mutual_choice.compare import CompareSpec, held_out_store, held_out_text, load_any_model
from sae_mutual_choice.evaluate import held_out_activations, trained_k
from sae_mutual_choice.yaml_config import read_yaml

CHUNK_TOKENS = 16_384


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("config", type=Path, help="a compare config: model, hook, held-out text")
    parser.add_argument("saes", type=Path, nargs="+", help="saved SAE directories")
    parser.add_argument("--batches", type=int, default=None, help="prompt batches to read (default: all)")
    args = parser.parse_args()
    spec = CompareSpec.from_dict(read_yaml(args.config))
    device, context = spec.setting("device"), spec.setting("context_size")
    model = load_any_model(spec.setting("model_name"), context, device, spec.setting("model_class_name"))
    text = held_out_text(spec, model)
    sae = SAE.load_from_disk(args.saes[0], device=device)
    n_batches = args.batches or len(text) // spec.evaluation.batch_prompts  # default: the whole split, once
    activations = held_out_activations(model, held_out_store(model, sae, text, spec), spec.hook, n_batches)
    print(f"{activations.shape[0]:,} held-out tokens\n")
    print("| SAE | k | L0 / k, all held-out | per 16k chunk: sd | min | max | chunks |")
    print("|---|---|---|---|---|---|---|")
    for path in args.saes:
        sae = SAE.load_from_disk(path, device=device)
        k = trained_k(sae)
        if k is None:
            continue
        with torch.no_grad():
            l0 = torch.cat([(sae.encode(x.to(device)) > 0).sum(-1).cpu() for x in activations.split(8192)])
        chunks = (
            torch.stack([c.float().mean() for c in l0.split(CHUNK_TOKENS) if c.numel() == CHUNK_TOKENS]) / k
        )
        print(
            f"| {path.name} | {k:g} | {float(l0.float().mean()) / k:.4f} | {float(chunks.std()):.4f} | "
            f"{float(chunks.min()):.4f} | {float(chunks.max()):.4f} | {chunks.numel()} |"
        )


if __name__ == "__main__":
    main()
