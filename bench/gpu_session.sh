#!/usr/bin/env bash
# The GPU session in one call: every GPU check of the project, results under $OUT.
#   here:   bash scripts/gpu_wheels.sh            (once; fills .whl/base/)
#   device: run(command="bash bench/gpu_session.sh", carry=[".whl/base"], timeout_s=540)
# With DALI (bash scripts/dali_wheel.sh: .whl/dali/ parts): one call per part first, back to back while the
# host is warm, the session carrying the last part - the sequence is in BENCHMARKS.md (GPU section). The parts
# are checked (sha256 each, then the whole wheel) and DALI installed into the session's site; a missing or bad
# part is named and the session runs without DALI.
# Parts, each logged on its own and run even if an earlier one failed:
#   1. bench/gpu_check.py: nvJPEG decode, augmentation and FaceSwap as device ops, loss on CUDA vs fp64 CPU,
#      NCCL all-gather with gradient, bf16 + channels_last ResNet-50 steps; bench/bench_compile_input.py:
#      the input ops eager vs compiled (static and dynamic shapes) on the GPU;
#   2. bench/bench_input.py --device cuda: FaceSwap and views with static vs dynamic shapes (data.shapes), and
#      the full input path's views/s on one GPU (torch path, and DALI's mixed/nvJPEG pipeline when DALI is
#      installed) against the torchvision DataLoader baseline (same cores, same
#      run) - the issue's ">= 20,000 views/s per H200";
#   3. launch/pretrain.py with the paper config (ResNet-50, 512 images/step, bf16, channels_last, FaceSwap,
#      MaskFN) for $STEPS steps on SynthFace, with data.finish_in=trainer and =workers: images/s and the
#      data-wait share of a step (goal < 5%), by bench/data_wait.py.
#   4. with STEP_BENCH=1: bench/bench_step.py on this device - (a) the compute-only ceiling, (b) the trainer,
#      (c) the original-code-style pipeline, images/s and ratios (STEP_ARGS: its arguments; default the paper
#      model at 112 px, CLIPS clips per step, 20 steps, PRECISION).
# DEVICE=cpu with small CLIPS/STEPS/MODEL runs the same steps on a CPU (tests/test_bench_scripts.py does).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu_session}
CLIPS=${CLIPS:-128}          # clips per step: 4x images ([A, NA, P, NP]); the paper's 512 images on one GPU
STEPS=${STEPS:-60}
THREADS=${THREADS:-$(nproc)}
IDENTITIES=${IDENTITIES:-256} # SynthFace corpus: IDENTITIES x 4 clips of 8 s at 128 px (8 steps per epoch at 128)
MODEL=${MODEL:-}             # extra overrides for the pretraining run (tests: a tiny model on CPU)
PRECISION=${PRECISION:-bf16_weights} # part 3 on CUDA: bf16_weights (the paper configs) or bf16_autocast
PY=${PY:-python3}
STEP_BENCH=${STEP_BENCH:-0}
STEP_ARGS=${STEP_ARGS:-"--sizes r50-112 --global-clips $CLIPS --steps 20 --set precision=$PRECISION"}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The carried wheels (make gpu-wheels) only where the host lacks them: never shadow an installed DeepSpeed.
wheels=$(ls .whl/base/*.whl 2>/dev/null || ls .whl/*.whl 2>/dev/null)  # one copy of each: two stop pip
if ! $PY -c "import deepspeed, prometheus_client" >/dev/null 2>&1 && [ -n "$wheels" ]; then
  # shellcheck disable=SC2086 # a list of wheel files
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" $wheels \
    || echo "[gpu_session] wheel install failed"
fi
# DALI from its carried parts (scripts/dali_wheel.sh), where the host has none.
if [ -f .whl/dali/SHA256SUMS ] && ! $PY -c "import nvidia.dali" >/dev/null 2>&1; then
  if bundle=$(bash scripts/dali_wheel.sh join "$WORK/dali"); then  # a tar of DALI + the wheels it needs
    mkdir -p "$WORK/dali/wheels" && tar -xf "$bundle" -C "$WORK/dali/wheels" && rm -f "$bundle"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
      "$WORK"/dali/wheels/*.whl && echo "[gpu_session] DALI installed from $(basename "$bundle")" \
      || echo "[gpu_session] DALI install failed"
    rm -rf "$WORK/dali"
  else
    echo "[gpu_session] no DALI this session (see the error above)"
  fi
fi
export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
status=0
part() {  # part NAME CMD...: run, log to $OUT/NAME.log, remember a failure, go on
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ $rc = 0 ] || status=1
}

{ date -u; uname -a; $PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import nvidia.dali as d; print('DALI', d.__version__)" 2>/dev/null || echo "DALI: not importable"
} | tee "$OUT/machine.txt"

if [ "$DEVICE" = cuda ]; then
  part gpu_check $PY bench/gpu_check.py --out "$OUT/gpu_check.md"
  # Does inductor pay for the input ops on a GPU? (On one CPU core it did not: BENCHMARKS.md.)
  part compile_input $PY bench/bench_compile_input.py --device cuda --batch 256
fi
part bench_input $PY bench/bench_input.py --parts shapes full --device "$DEVICE" --threads "$THREADS" \
  --clips "$CLIPS" --full-batches 20 --no-extras
part synth $PY -m data_shards synth --out "$WORK/clips" --identities "$IDENTITIES" --clips-per-identity 4 \
  --seconds 8 --size 128 --seed 0
precision=$PRECISION
[ "$DEVICE" = cuda ] || precision=fp32
# Both ways of finishing batches on a GPU (data.finish_in): the training thread queues the device work on its
# stream (auto), or each worker thread on its own CUDA stream, handing over an event.
for finish in trainer workers; do
  # shellcheck disable=SC2086 # MODEL is a list of overrides
  part "pretrain_$finish" $PY launch/pretrain.py --config launch/configs/sslfer.yaml data.url="$WORK/clips" \
    run_dir="$WORK/run_$finish" device="$DEVICE" precision=$precision zero_stage=0 max_steps="$STEPS" \
    log_every=10 checkpoint_every=0 data.pipeline=torch data.global_batch_clips="$CLIPS" \
    data.num_workers="$THREADS" data.finish_in=$finish metrics.port_base=0 \
    faceswap.start_step=0 faceswap.p_warmup_steps=0 $MODEL  # FaceSwap in every measured step
  cp "$WORK/run_$finish/metrics.jsonl" "$OUT/pretrain_${finish}_metrics.jsonl" 2>/dev/null
  cp "$WORK/run_$finish/config.yaml" "$OUT/pretrain_${finish}_config.yaml" 2>/dev/null
  part "data_wait_$finish" $PY bench/data_wait.py "$OUT/pretrain_${finish}_metrics.jsonl"
done
# The same run on DALI's pipeline (mixed decode and GPU ops on cuda), where DALI is importable.
if $PY -c "import nvidia.dali" >/dev/null 2>&1; then
  # shellcheck disable=SC2086 # MODEL is a list of overrides
  part pretrain_dali $PY launch/pretrain.py --config launch/configs/sslfer.yaml data.url="$WORK/clips" \
    run_dir="$WORK/run_dali" device="$DEVICE" precision=$precision zero_stage=0 max_steps="$STEPS" \
    log_every=10 checkpoint_every=0 data.pipeline=dali data.global_batch_clips="$CLIPS" \
    data.num_workers="$THREADS" metrics.port_base=0 faceswap.start_step=0 faceswap.p_warmup_steps=0 $MODEL
  cp "$WORK/run_dali/metrics.jsonl" "$OUT/pretrain_dali_metrics.jsonl" 2>/dev/null
  part data_wait_dali $PY bench/data_wait.py "$OUT/pretrain_dali_metrics.jsonl"
fi
if [ "$STEP_BENCH" = 1 ]; then
  # shellcheck disable=SC2086 # STEP_ARGS is a list of arguments
  part bench_step $PY bench/bench_step.py --device "$DEVICE" $STEP_ARGS
fi
exit $status
