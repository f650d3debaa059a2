#!/bin/bash
# Issue 6's GPU checks of 2026-11-30 18:45 (docs/performance.md, that section), in steps that fit
# device calls (a call allows 10 minutes; each step below takes 2-5 on an H200 with the compiles). Logs and JSON go to $OUT (default
# ./gpu_session_out). Run from the repository root, all steps or some:
#     OUT=/tmp/out bash benchmarks/gpu_session.sh prefill
#     OUT=/tmp/out bash benchmarks/gpu_session.sh attnpdl
# prefill: the graphed prefill (CudaGraphRunner(prefill_graphs=True)) against the eager prefill, time per
#          request at batch 1 / 8 / 64, and its GPU tests;
# attnpdl: the attention ops with / without PDL at 128 rows and in the 8 x 4 beam step, one process each;
# profile: flan-t5-large's greedy step by kernel at batch 64 and 256 (where its batch-256 time goes);
# gluon:   the persistent Gluon GEMM chain (benchmarks/gluon_chain.py) against cuBLAS's, 32 and 64 rows
#          (a deadlocked grid barrier would end at the step's time limit);
# timeline: one end-to-end greedy request profiled (benchmarks/e2e_timeline.py): GPU busy / idle, batch 1-256;
# tokens:  the token-match criterion's noise floor (benchmarks/token_match.py), free-running and teacher-forced;
# sampling: sampling's fused graph against generate's token loop and HF (benchmarks/time_sampling.py), and its tests.
set -u
OUT=${OUT:-gpu_session_out}
mkdir -p "$OUT"
export PYTHONPATH=.:families${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
source "$(dirname "$0")/_session.sh"
ARGS=("$@")
STEP=prefill; if want "${ARGS[@]}"; then
    step prefill_time 240 python benchmarks/time_prefill.py --model bart-large --batches 1,8,64 \
        --prefill-graphs 0,1 --out "$OUT"
    step prefill_tests 240 python -m pytest -v -p no:cacheprovider -m gpu tests/test_cuda_runner.py \
        -k static_prefill --tb=short
fi
STEP=attnpdl; if want "${ARGS[@]}"; then
    for pol in inductor inductor-noattnpdl; do
        step "sweep_$pol" 150 python benchmarks/sweep_step.py --models bart-large --batches 128 --policies $pol \
            --out "$OUT"
    done
    step beam_attnpdl 150 python benchmarks/bench_gpu.py --models bart-large --configs 8x4 --repeats 3 --no-hf \
        --out "$OUT" --tag _attnpdl
    step beam_noattnpdl 150 python benchmarks/bench_gpu.py --models bart-large --configs 8x4 --repeats 3 --no-hf \
        --no-attention-pdl --out "$OUT" --tag _noattnpdl
fi
STEP=profile; if want "${ARGS[@]}"; then
    step profile 240 python benchmarks/bench_gpu.py --models "" --profile flan-t5-large --profile-batches 64,256 \
        --out "$OUT"
fi
STEP=gluon; if want "${ARGS[@]}"; then
    step gluon_chain 300 python benchmarks/gluon_chain.py --models bart-large,flan-t5-large --m 32,64 \
        --variants s8.xpf,x4.s4.va,x4.s4.va.df,x2.s6.va.df,x1.s8.va.df,x4.s8.va.df,x4.s4.va.df.a2,x4.s4.va.df.a4 \
        --out "$OUT"
fi
STEP=timeline; if want "${ARGS[@]}"; then
    step e2e_timeline_large 400 python benchmarks/e2e_timeline.py --models flan-t5-large,bart-large --batches 64,256 \
        --out "$OUT"
    step e2e_timeline_small 300 python benchmarks/e2e_timeline.py --models t5-small,bart-large --batches 1,8 --out "$OUT"
fi
STEP=tokens; if want "${ARGS[@]}"; then
    mkdir -p "$OUT/tf"
    step token_match 400 python benchmarks/token_match.py --models bart-large,flan-t5-large --batches 64 --out "$OUT"
    step token_match_tf 300 python benchmarks/token_match.py --models bart-large,flan-t5-large --batches 64 \
        --teacher-forced --out "$OUT/tf"
fi
STEP=sampling; if want "${ARGS[@]}"; then
    step sampling_tests 250 python -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_runner.py \
        -k "sampling_runs or greedy_runs"
    step sampling_t5 220 python benchmarks/time_sampling.py --models t5-small --batches 1,8,64 --hf-batches 1,8,64 \
        --hf-static-batches 1 --out "$OUT"
    step sampling_bart 330 python benchmarks/time_sampling.py --models bart-large --batches 1,8,64 --hf-batches 1,8,64 \
        --hf-static-batches 1 --out "$OUT/bart"
fi
