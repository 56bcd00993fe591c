#!/usr/bin/env bash
# Every GPU check of this repository in one command, for a GPU machine held for a few minutes: run it from the
# repository root.
#
#     bash bench/gpu_all.sh OUT [OFFICIAL] [STAGES]
#
# OFFICIAL: an extracted rtdetrv2_pytorch of github:lyuwenyu/RT-DETR (or ""); STAGES: which of the stages below
# to run, default "1 2 3 4". GPU_CHECK_ONLY (environment): the steps of stage 2 (bench/gpu_check.py --only;
# default all but pytest_cuda, which stage 1 runs). Time limits: stage 1 150 s, 2 400 s, 3 240 s, 4 120 s; under
# a 10-minute limit per command run "1 3" (at most 6.5 min), then "2 4" (at most 8.7 min). On an H200
# (2026-12-04) stage 1 took 108 s, stage 2 with GPU_CHECK_ONLY="dset_float16 dset_bfloat16" 138 s (the DDP rows
# add about 90 s), stage 3 80 s.
#
# In order of importance, each with its own time limit, each writing into OUT as it ends (a later one that times
# out loses nothing before it):
#   1. what is not timed, in parallel: pytest -m cuda tests/test_cuda.py (OUT/pytest_cuda.txt);
#      bench/sync_count.py --device cuda on configs/dset4_r18_synth_cpu.yaml pruning from the first step, float32
#      and float16 AMP, and float32 with --explain-backward (OUT/sync_count.txt; issue 18's goal: at most 4 host
#      syncs per step); bench/op_count.py --device cuda (operators, kernels, syncs per forward of the fused
#      models; OUT/op_count_cuda.{json,txt});
#   2. bench/gpu_check.py: the autocast probe, DSET float16 / bfloat16 at 1280x736 (throughput), DDP 2 ranks and
#      a resume (OUT/gpu_check.json, its table in OUT/gpu_check.txt, its logs in OUT/logs.tgz), alone on the GPU;
#   3. bench/latency_bench.py --devices cuda --cuda-graph (eager float32 / float16 and CUDA-graph rows; with
#      OFFICIAL the official model too) (OUT/latency_cuda.{json,md}), alone on the GPU;
#   4. tools/bias_experiment.py --profile smoke --device cuda --jobs 4: the parallel GPU job path of the bias
#      experiment, small (OUT/logs.tgz). The full gpu profile (3 seeds, about 30 runs) takes longer than such a
#      machine is held here.
# Exit status: 0 when pytest and every gpu_check row that ran are ok. Figures go to docs/performance.md /
# docs/reliability.md by hand, with the GPU name and the date from OUT/env.txt.
set -u
OUT=${1:?usage: bash bench/gpu_all.sh OUT [OFFICIAL]}
OFFICIAL=${2:-}
STAGES=" ${3:-1 2 3 4} "
PY=${PYTHON:-python3}
WORK=output/gpu_all
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

pack() {  # every log so far into one archive (the device tool brings back at most 8 files)
    tar czf "$OUT/logs.tgz" --exclude='*.pth' --exclude='*.jpg' --exclude='data' -C "$WORK" . 2>/dev/null
}
stage() { echo "== $(date +%T) $*"; }

{
    date -u +%F
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$PY" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'python', platform.python_version(), 'cpus', __import__('os').cpu_count())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

RC=0
if [[ $STAGES == *" 1 "* ]]; then
stage "1 pytest -m cuda, sync_count, op_count (in parallel)"
test -f dataset/roadside_synth/annotations/instances_train.json || \
    "$PY" tools/make_synthetic_roadside.py --out dataset/roadside_synth --num-train 48 --num-val 16 --seed 0 \
        > "$WORK/make_data.log" 2>&1
SYNC=(-m bench.sync_count -c configs/dset4_r18_synth_cpu.yaml --device cuda -u dset.token_pruning_warmup_epochs=0)
timeout -k 10 150 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider > "$OUT/pytest_cuda.txt" 2>&1 &
PYTEST_PID=$!
timeout -k 10 150 "$PY" "${SYNC[@]}" --steps 5 > "$WORK/sync_f32.log" 2>&1 &
timeout -k 10 150 "$PY" "${SYNC[@]}" use_amp=true amp_dtype=float16 --steps 5 > "$WORK/sync_f16.log" 2>&1 &
timeout -k 10 150 "$PY" "${SYNC[@]}" --steps 3 --explain-backward > "$WORK/sync_explain.log" 2>&1 &
timeout -k 10 150 "$PY" -m bench.op_count --device cuda --inputs 640x640 736x1280 \
    --variants plain_p5 dset_k0.3_moe dset_k0.3_dense ${OFFICIAL:+--official "$OFFICIAL"} \
    --out "$OUT/op_count_cuda.json" > "$WORK/op_count_cuda.log" 2>&1 &
wait $PYTEST_PID || RC=1
wait
tail -n 3 "$OUT/pytest_cuda.txt"
for f in sync_f32 sync_f16 sync_explain; do echo "== $f"; grep -v "^epoch" "$WORK/$f.log" | tail -n 25; done \
    > "$OUT/sync_count.txt"
cat "$OUT/sync_count.txt"
grep "^|\|^-" "$WORK/op_count_cuda.log" | tee "$OUT/op_count_cuda.txt"
pack
fi

if [[ $STAGES == *" 2 "* ]]; then
stage "2 gpu_check"
timeout -k 10 400 "$PY" -m bench.gpu_check --out "$WORK/gpu_check" --result "$OUT/gpu_check.json" \
    --only ${GPU_CHECK_ONLY:-dset_float16 dset_bfloat16 ddp_2ranks ddp_resume} > "$OUT/gpu_check.txt" 2>&1 || RC=1
tail -n 12 "$OUT/gpu_check.txt"
pack
fi

if [[ $STAGES == *" 3 "* ]]; then
stage "3 latency_bench cuda, eager and CUDA graphs"
timeout -k 10 240 "$PY" -m bench.latency_bench --devices cuda --cuda-graph --no-onnx --repeats 20 --warmup 3 \
    --variants plain_p5 dset_k0.3_moe dset_k0.3_dense \
    ${OFFICIAL:+--official "$OFFICIAL"} --out "$OUT/latency_cuda.json" > "$WORK/latency_cuda.log" 2>&1
tail -n 12 "$WORK/latency_cuda.log"
pack
fi

if [[ $STAGES == *" 4 "* ]]; then
stage "4 bias_experiment smoke on cuda"
timeout -k 10 120 "$PY" tools/bias_experiment.py --profile smoke --device cuda --jobs 4 \
    --out "$WORK/bias_smoke" --work "$WORK/bias_smoke_work" > "$WORK/bias_smoke.log" 2>&1
echo "bias smoke exit status $?"
tail -n 3 "$WORK/bias_smoke.log"
pack
fi
stage "done (exit status $RC)"
exit $RC
