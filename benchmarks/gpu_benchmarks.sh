#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md (written for an H100 / H200), in four parts of a few minutes each.
#
#   bash benchmarks/gpu_benchmarks.sh PART [OUT_DIR]      (OUT_DIR: default $OUT, else bench_out)
#
# PART:
#   check  the CUDA tests (backend equality; CUDA graph replay == eager on a perturbed model: sdpa,
#          varlen_attn, flash_attention_2 when installed, time-conditioned, fp32 / bf16 autocast /
#          bf16 weights) and a tiny graphed benchmark, fp32 weights and bf16 weights           (~2 min)
#   b1     batch 1, L = K = 1024, linear + exponential: eager, then CUDA graphs over fp32 weights
#          (bf16 autocast) and over bf16 weights (cast once)                                    (~8 min)
#   b32    batch 32, L = K = 1024, linear + exponential, CUDA graphs over bf16 weights,
#          Elastic vs cached MDLM                                                               (~6 min)
#   train  training step time, tokens/s and MFU, both objectives, batch 32 and 8, L = 1024,
#          eager then torch.compile (dynamic shapes: the Elastic active length changes every step)   (~5 min)
#
# Model: the 12 x 768 DiT with the GPT-2 vocabulary (MDLM-OWT size), random weights, oracle trajectories
# (benchmarks/oracle.py), bf16 autocast (over fp32 weights unless a run says bf16 weights: --dtype bf16-weights casts
# the model once, so that a graph replay does not re-cast every weight), torch varlen attention. It needs torch >= 2.10 and transformers;
# datasets, evaluate and deepspeed are not imported. Every table states its own settings.
set -euo pipefail
part=${1:?usage: gpu_benchmarks.sh check|b1|b32|train [out_dir]}
out=${2:-${OUT:-bench_out}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/machine_$part.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/machine_$part.txt"

size=(--oracle --hidden_size 768 --num_hidden_layers 12 --num_attention_heads 12 --vocab_size 50258 --length 1024
      --num_steps 1024 --device cuda --dtype bf16 --attn_implementation varlen_attn)
bench() { python -m benchmarks.benchmark "${size[@]}" "$@"; }

case $part in
  check)
    python -m pytest -q -m gpu -p no:cacheprovider tests/test_modeling.py tests/test_cuda_graphs.py 2>&1 \
        | tee "$out/gpu_tests.log"
    for dtype in bf16 bf16-weights; do
        python -m benchmarks.benchmark --oracle --hidden_size 64 --num_hidden_layers 2 --num_attention_heads 2 \
            --vocab_size 256 --length 64 --num_steps 64 --batch_size 4 --schedule linear --device cuda \
            --dtype $dtype --attn_implementation varlen_attn --cuda_graphs --skip training \
            --output "$out/tiny_graphs_$dtype.md"
    done
    ;;
  b1)
    # eager: ~20 ms per pass whatever its length (docs/design.md §8), so one timed run after the counted one
    bench --batch_size 1 --schedule linear exponential --skip training --warmup 0 --repeats 1 \
        --output "$out/gpu_eager_b1.md"
    bench --batch_size 1 --schedule linear exponential --skip training --cuda_graphs --warmup 1 --repeats 3 \
        --output "$out/gpu_graphs_b1.md"
    bench --batch_size 1 --schedule linear exponential --skip training --cuda_graphs --warmup 1 --repeats 3 \
        --dtype bf16-weights --output "$out/gpu_graphs_b1_bf16_weights.md"
    ;;
  b32)
    # MDLM without cache costs what the cached one does at batch 32 (every canvas changes at almost every step)
    bench --batch_size 32 --schedule linear exponential --skip training --cuda_graphs --warmup 0 --repeats 1 \
        --variants elastic mdlm-cached --dtype bf16-weights --output "$out/gpu_graphs_b32_bf16_weights.md"
    ;;
  train)
    bench --batch_size 32 --skip sampling --output "$out/gpu_train_b32.md"
    bench --batch_size 8 --skip sampling --output "$out/gpu_train_b8.md"
    bench --batch_size 32 --skip sampling --compile --output "$out/gpu_train_b32_compile.md"
    ;;
  *)
    echo "unknown part '$part': check | b1 | b32 | train" >&2
    exit 2
    ;;
esac
