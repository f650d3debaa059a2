#!/bin/bash
# Issue 8's open measurements on a 2-GPU machine, with the runner's defaults (tp_allreduce="auto":
# the fused all-reduce where the GPUs map each other's memory). Logs and JSON go to $OUT (default
# ./multi_gpu_out). Run from the repository root, all steps or some (a device call allows 10 minutes:
# "kernel parity" takes about 6 on 2 x H200, "scale" about 6):
#     OUT=/tmp/out bash benchmarks/multi_gpu_session.sh kernel parity
#     OUT=/tmp/out bash benchmarks/multi_gpu_session.sh scale
# 1. the fused all-reduce kernel against torch's sum (bit-identical, eager and CUDA graphs);
# 2. bf16 ids of TP = 2 against one GPU on flan-t5-large and bart-large shapes (greedy, beam 4):
#    "ALL EQUAL", or "EQUAL EXCEPT AT NEAR-TIES" with every difference shown to be a near-tie, or
#    "AS CLOSE TO FP32 AS ONE GPU" (TP's logits as far from the fp32 model as one GPU's bf16 ones);
# 3. flan-t5-xl scaling, in 512 / out 128, batch 1 / 8 / 64, one and two GPUs, profiles at 64.
set -u
OUT=${OUT:-multi_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=.:families${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
source "$(dirname "$0")/_session.sh"
ARGS=("$@")
STEP=kernel; if want "${ARGS[@]}"; then
    step kernel 120 python -m torch.distributed.run --standalone --nproc-per-node 2 tests/mpi_scripts/fused_allreduce.py \
        || exit 1
fi
STEP=parity; if want "${ARGS[@]}"; then
    step parity 330 python benchmarks/multi_gpu.py parity --models flan-t5-large,bart-large --mappings 1x1,2x1 \
        --out "$OUT" --timeout 160
fi
STEP=scale; if want "${ARGS[@]}"; then
    step scale 540 python benchmarks/multi_gpu.py scale --model flan-t5-xl --batches 1,8,64 --mappings 1x1,2x1 \
        --repeats 2 --compile-encoder --profile-batches 64 --out "$OUT" --timeout 260
fi
