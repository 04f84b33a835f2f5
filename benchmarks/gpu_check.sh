#!/usr/bin/env bash
# The GPU check: SFT, reward, DPO, PPO and GRPO (and GRPO with vLLM where vllm imports) on SmolLM2-135M-Instruct
# in bf16 on one GPU, in under 10 minutes; tokens/s (SFT, DPO), episodes/s (PPO), steps/s (GRPO) and peak GPU
# memory, read from the stages' own metrics.json / trainer_state.json by benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [--gpu | --cpu] [--out FILE]
#
#   (no flag)  the GPU mode when torch sees a GPU, else the tiny mode
#   --gpu      the GPU mode or a loud failure: SmolLM2-135M-Instruct, recipes/smollm2-135m, bf16, a few dozen steps
#   --cpu      the tiny mode on the CPU even where a GPU is present: rlhf.tiny's Llama, recipes/tiny, fp32, a
#              handful of steps (also GPU_CHECK_MODEL=tiny, which keeps the GPU if there is one)
#   --out FILE the results file (JSON); else $GPU_CHECK_OUT, else benchmarks/results/gpu_check.json
#
# Needs only what `make setup` installs (with a CUDA build of torch for the GPU mode); vLLM is optional.
# GPU_CHECK_TIMEOUT (seconds, default 600) bounds the run; GPU_CHECK_KEEP=1 keeps the scratch folder.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

model="${GPU_CHECK_MODEL:-auto}"
out="${GPU_CHECK_OUT:-benchmarks/results/gpu_check.json}"
while (($#)); do
    case "$1" in
    --gpu) model=smollm2 ;;
    --cpu)
        model=tiny
        export CUDA_VISIBLE_DEVICES=""
        ;;
    --out)
        [[ $# -ge 2 ]] || { echo "gpu_check: --out needs a file name" >&2; exit 2; }
        out="$2"
        shift
        ;;
    -h | --help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 0
        ;;
    *)
        echo "gpu_check: unknown argument $1 (see --help)" >&2
        exit 2
        ;;
    esac
    shift
done
case "$model" in
auto | smollm2 | tiny) ;;
*)
    echo "gpu_check: GPU_CHECK_MODEL=$model; use tiny, smollm2 or auto" >&2
    exit 2
    ;;
esac

python="${PYTHON:-$repo/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "gpu_check: $python not found; run \`make setup\` first (or set PYTHON)" >&2
    exit 2
fi

# No network on a measuring machine: a Hub lookup must fail at once, not wait.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

workdir="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
if [[ "${GPU_CHECK_KEEP:-0}" == 1 ]]; then
    echo "gpu_check: scratch outputs kept in $workdir" >&2
else
    trap 'rm -rf "$workdir"' EXIT
fi

if command -v nvidia-smi >/dev/null && [[ "$model" != tiny ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi

limit="${GPU_CHECK_TIMEOUT:-600}"
status=0
timeout --kill-after=30 "$limit" "$python" benchmarks/gpu_check.py --model "$model" --out "$out" \
    --workdir "$workdir" || status=$?
if ((status == 124 || status == 137)); then
    echo "gpu_check: FAILED, stopped after ${limit} s (GPU_CHECK_TIMEOUT); the stages that finished are in $out" >&2
elif ((status != 0)); then
    echo "gpu_check: FAILED (exit $status); the stages that finished, if any, are in $out" >&2
fi
exit "$status"
