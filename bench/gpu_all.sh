#!/usr/bin/env bash
# Every GPU check of this repository in one command, for a GPU machine held for a few minutes (about 6 min on
# one H200): run it from the repository root.
#
#     bash bench/gpu_all.sh OUT [OFFICIAL] [STAGES]
#
# OFFICIAL: an extracted rtdetrv2_pytorch of github:lyuwenyu/RT-DETR (or ""); STAGES: which of the stages below
# to run, default "1 2 3 4". Stages 1-2 take at most 8.5 min and stages 3-4 at most 6 min by their time limits,
# so under a 10-minute limit per command run them as two commands: "1 2", then "3 4".
#
# In order of importance, each with its own time limit, each writing into OUT as it ends (a later one that times
# out loses nothing before it):
#   1. bench/gpu_check.py: pytest -m cuda, the autocast probe, DSET float16 / bfloat16 at 1280x736, DDP 2 ranks
#      and a resume (OUT/gpu_check.json, its table in OUT/gpu_check.txt, its logs in OUT/logs.tgz);
#   2. bench/sync_count.py --device cuda on configs/dset4_r18_synth_cpu.yaml pruning from the first step, float32
#      and float16 AMP (OUT/sync_count.txt; issue 18's goal: at most 4 host syncs per step);
#   3. bench/latency_bench.py --devices cuda (float32 and float16 rows; with OFFICIAL the official model too)
#      (OUT/latency_cuda.{json,md}) and bench/op_count.py --device cuda (operators, kernels, syncs per forward)
#      (OUT/op_count_cuda.txt);
#   4. tools/bias_experiment.py --profile smoke --device cuda --jobs 4: the parallel GPU job path of the bias
#      experiment, small (OUT/logs.tgz). The full gpu profile (3 seeds, about 30 runs) takes longer than such a
#      machine is held here.
# Exit status: that of gpu_check (0 when every row is ok). Figures go to docs/performance.md / docs/reliability.md
# by hand, with the GPU name and the date from OUT/env.txt.
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

CHECK_RC=0
if [[ $STAGES == *" 1 "* ]]; then
stage "1 gpu_check"
timeout -k 10 330 "$PY" -m bench.gpu_check --out "$WORK/gpu_check" --result "$OUT/gpu_check.json" \
    > "$OUT/gpu_check.txt" 2>&1
CHECK_RC=$?
tail -n 12 "$OUT/gpu_check.txt"
pack
fi

if [[ $STAGES == *" 2 "* ]]; then
stage "2 sync_count"
test -f dataset/roadside_synth/annotations/instances_train.json || \
    "$PY" tools/make_synthetic_roadside.py --out dataset/roadside_synth --num-train 48 --num-val 16 --seed 0 \
        > "$WORK/make_data.log" 2>&1
timeout -k 10 80 "$PY" -m bench.sync_count -c configs/dset4_r18_synth_cpu.yaml --device cuda --steps 5 \
    -u dset.token_pruning_warmup_epochs=0 > "$WORK/sync_f32.log" 2>&1
timeout -k 10 80 "$PY" -m bench.sync_count -c configs/dset4_r18_synth_cpu.yaml --device cuda --steps 5 \
    -u dset.token_pruning_warmup_epochs=0 use_amp=true amp_dtype=float16 > "$WORK/sync_f16.log" 2>&1
for f in sync_f32 sync_f16; do echo "== $f"; grep -v "^epoch" "$WORK/$f.log" | tail -n 20; done > "$OUT/sync_count.txt"
cat "$OUT/sync_count.txt"
fi

if [[ $STAGES == *" 3 "* ]]; then
stage "3 latency_bench cuda"
timeout -k 10 150 "$PY" -m bench.latency_bench --devices cuda --no-onnx --repeats 20 --warmup 3 \
    --variants plain_p5 plain_p4p5 dset_k1.0_moe dset_k0.3_moe dset_k0.3_dense \
    ${OFFICIAL:+--official "$OFFICIAL"} --out "$OUT/latency_cuda.json" > "$WORK/latency_cuda.log" 2>&1
tail -n 4 "$WORK/latency_cuda.log"
timeout -k 10 45 "$PY" -m bench.op_count --device cuda --inputs 640x640 \
    --variants plain_p5 dset_k0.3_moe dset_k0.3_dense ${OFFICIAL:+--official "$OFFICIAL"} \
    > "$WORK/op_count_cuda.log" 2>&1
grep "^|\|^-" "$WORK/op_count_cuda.log" | tee "$OUT/op_count_cuda.txt"
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
stage "done (gpu_check exit status $CHECK_RC)"
exit $CHECK_RC
