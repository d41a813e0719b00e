#!/usr/bin/env bash
# Every GPU measurement of bench/ in one call on a lent GPU machine, most important first, each under
# its own time limit and all within BENCH_BUDGET seconds (a step that would not fit is skipped and
# says so). Prepare here with `bash bench/fetch_wheels.sh`, then on the device, with carry=[".whl"]:
#     bash bench/gpu.sh
# $OUT (or /tmp/bench-out) receives log.txt (everything printed) and entries.md (the entries this run
# appended to bench/RESULTS.md, to paste into the copy in the repository).
# Dry run on a CPU: BENCH_DEVICE=cpu BENCH_ARGS=--quick bash bench/gpu.sh (without .whl/: its wheels are
# for the device's Python 3.12)
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/bench-out}
device=${BENCH_DEVICE:-cuda}
budget=${BENCH_BUDGET:-480}
read -r -a extra <<< "${BENCH_ARGS:-}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
[ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee -a "$out/log.txt"
start=$(wc -c < bench/RESULTS.md)

step() {  # step LIMIT_SECONDS SCRIPT ARGS...: run it if LIMIT still fits in the budget
  local limit=$1; shift
  if (( SECONDS + limit > budget )); then
    echo "== skipped (budget ${budget}s, ${SECONDS}s used): $*" | tee -a "$out/log.txt"
    return
  fi
  echo "== $* (limit ${limit}s, ${SECONDS}s used)" | tee -a "$out/log.txt"
  # -k: a process that ignores the TERM is killed 10 s later, so one step never eats the next one's time.
  timeout -k 10 "$limit" python3 "$@" --device "$device" "${extra[@]}" >> "$out/log.txt" 2>&1
  echo "   exit $? after ${SECONDS}s" | tee -a "$out/log.txt"
  # After every step, so that entries.md holds all that was measured even if the call itself is cut short.
  tail -c +$((start + 1)) bench/RESULTS.md > "$out/entries.md"
}

step 100 bench/inference.py --amp bf16 --warmup 2
step 100 bench/train_step.py --also bf16 --warmup 2
step 90 bench/profile_inference.py --real_size --peer
step 90 bench/profile_inference.py --real_size --peer --backbone swinunetr
step 60 bench/inference.py --amp bf16 --only unet --also channels_last sw16 --warmup 2
step 90 bench/memory.py --skip-host
step 200 bench/train_step.py --only swin --also bf16+compile --warmup 2
step 60 bench/profile_step.py --backbone swin --amp bf16
step 90 bench/inference.py --warmup 2
step 120 bench/train_step.py --only unet --also bf16+compile bf16+channels_last --warmup 2
grep -v "^  round" "$out/log.txt" | tail -n 80
