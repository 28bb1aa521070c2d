#!/usr/bin/env bash
# The GPU checks in one script, for a lent GPU machine (no network there). From the repo root:
#   PYTHONPATH=/tmp/site:$PWD OUT=$OUT bash tools/gpu_check.sh
# /tmp/site must hold DALI + lmdb (shared/reference/tools/dali-offline-bundle.sh) and, for the
# GPU tests, pytest (e.g. `pip download pytest iniconfig pluggy packaging` unzipped beside them).
#
# Steps (each bounded by `timeout`, all within BUDGET_S seconds, default 420, so that with the
# bundle unpacked first the whole check stays under 8 minutes on one H100):
#   env            OUT/env.json: device, driver, CUDA, torch, DALI, date, git commit
#   data           a small synthetic dataset (720 JPEGs 500x375, short side 256, LMDB + RecordIO)
#   gpu-tests      tests/test_gpu.py -> OUT/pytest.xml
#   bench          alexnet-pipe benchmark -b gpu (seed's method vs the same-run plain baseline)
#   sweep          tools/dali_sweep.py: hw_decoder_load, DALI CPU threads, prefetch depth -> OUT/sweep.json
#   e2e            the benchmark with the DALI train pipeline feeding the model, and the pipeline
#                  alone against a PIL DataLoader (--loader)
#   train          3 epochs of bf16 GPU training (LMDB), then 2 from RecordIO
#   test-predict   test and predict (torch on the GPU) with the trained weights; one epoch of
#                  --finetune --freeze conv from them
#   bench-compile  the benchmark with torch.compile (last: its compilation is the slowest step)
# A failed step does not stop the later ones unless they need its output (they are then
# "skipped"). Every step's output is kept in OUT/<step>.log; OUT/steps.json lists each step's
# status (ok / failed / timeout / skipped), exit code and seconds; OUT/summary.json gathers the
# steps and every figure. The script exits 1 when any step did not succeed.
# Knobs: PY (python), WORK (scratch), BUDGET_S, and per-step caps (CAP_<STEP>, e.g. CAP_BENCH=60).
set -uo pipefail
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
WORK=${WORK:-/tmp/alexnet-pipe-gpu}
BUDGET_S=${BUDGET_S:-420}
RESERVE_S=15  # kept back for the summary
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PY WORK OUT
START_NS=$(date +%s%N)
declare -A STATUS
ENTRIES=()

json_str() {  # a JSON string literal for $1
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}

elapsed_s() { echo $(( ($(date +%s%N) - START_NS) / 1000000000 )); }

write_steps() {
  local IFS=,
  printf '{"budget_s": %s, "elapsed_s": %s, "steps": [%s]}\n' "$BUDGET_S" "$(elapsed_s)" "${ENTRIES[*]}" \
    > "$OUT/steps.json"
}

record() {  # record NAME STATUS RC SECONDS NOTE
  STATUS[$1]=$2
  ENTRIES+=("{\"name\": $(json_str "$1"), \"status\": \"$2\", \"rc\": $3, \"seconds\": $4, \"log\": $(json_str "$OUT/$1.log"), \"note\": $(json_str "$5")}")
  printf '%-14s %-8s rc=%-4s %6ss  %s\n' "$1" "$2" "$3" "$4" "$5"
  write_steps
}

# step NAME CAP_S NEEDS CMD...: run CMD under timeout (the smaller of CAP_S and what the budget has
# left), its output in OUT/NAME.log; skipped when the step NEEDS did not succeed or no time is left.
step() {
  local name=$1 cap=$2 needs=$3
  shift 3
  local var="CAP_${name^^}"
  var=${var//-/_}
  cap=${!var:-$cap}
  if [[ -n $needs && ${STATUS[$needs]:-} != ok ]]; then
    record "$name" skipped null 0 "needs step $needs, which did not succeed"
    return
  fi
  local left=$(( BUDGET_S - RESERVE_S - $(elapsed_s) ))
  if (( left < 10 )); then
    record "$name" skipped null 0 "time budget (BUDGET_S=$BUDGET_S) spent"
    return
  fi
  local limit=$(( cap < left ? cap : left ))
  local t0=$(date +%s%N) rc
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local secs=$(( ($(date +%s%N) - t0) / 1000000 ))
  secs=$(printf '%d.%03d' $((secs / 1000)) $((secs % 1000)))
  if (( rc == 0 )); then
    record "$name" ok "$rc" "$secs" ""
  elif (( rc == 124 || rc == 137 )); then
    record "$name" timeout "$rc" "$secs" "killed after ${limit}s"
  else
    record "$name" failed "$rc" "$secs" "$(tail -n 1 "$OUT/$name.log" | cut -c1-300)"
  fi
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
step env 40 "" "$PY" tools/gpu_summary.py env "$OUT"
step data 90 "" bash -c '"$PY" tools/make_shapes.py "$WORK/raw" --train 64 --val 8 --size 500x375 &&
  "$PY" -m alexnet_pipe convert "$WORK/raw" "$WORK/data" --format both --short-side 256 --no-progress'
step gpu-tests 150 "" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py --junitxml="$OUT/pytest.xml"
step bench 90 "" "$PY" -m alexnet_pipe benchmark -b gpu -o "$OUT/bench.jsonl"
step sweep 120 data "$PY" tools/dali_sweep.py "$WORK/data" -o "$OUT/sweep.json" --budget-s 90
step e2e 120 data "$PY" -m alexnet_pipe benchmark -b gpu -w "$WORK/data" --loader "$WORK/data" --throughput-steps 20 \
  -o "$OUT/bench.jsonl"
step train 90 data "$PY" -m alexnet_pipe train -w "$WORK/data" -b gpu -e 3 -z 128 --lr 0.003 --init kaiming \
  --no_progress_bar -s "$WORK/w.pt" -o "$OUT/train.jsonl"
step train-recordio 60 data "$PY" -m alexnet_pipe train -w "$WORK/data" -b gpu -e 2 --reader recordio \
  --no_progress_bar -o "$OUT/train-recordio.jsonl"
step test-predict 60 train bash -c '"$PY" -m alexnet_pipe test -w "$WORK/data" -b gpu --model-file "$WORK/w.pt" \
  --no-progress -o "$OUT/test.jsonl" && "$PY" -m alexnet_pipe predict --model-file "$WORK/w.pt" -b gpu --json \
  "$WORK/raw/val" > "$OUT/predict.json" && "$PY" -m alexnet_pipe train -w "$WORK/data" -b gpu -e 1 \
  --model-file "$WORK/w.pt" --finetune --freeze conv --no-progress -s "$WORK/ft.pt" -o "$OUT/finetune.jsonl"'
step bench-compile 180 "" "$PY" -m alexnet_pipe benchmark -b gpu --compile -o "$OUT/bench.jsonl"

failed=0
for e in "${ENTRIES[@]}"; do [[ $e == *'"status": "ok"'* ]] || failed=1; done
if ! timeout 60 "$PY" tools/gpu_summary.py collect "$OUT" > "$OUT/collect.log" 2>&1 || [[ ! -s $OUT/summary.json ]]; then
  if [[ ! -s $OUT/summary.json ]] || ! grep -q '"failed_steps"' "$OUT/summary.json"; then
    # no Python to merge the figures: the steps alone, so that the summary always exists
    names=()
    for e in "${ENTRIES[@]}"; do
      [[ $e == *'"status": "ok"'* ]] || names+=("$(sed -E 's/^\{"name": ("[^"]*").*/\1/' <<< "$e")")
    done
    { printf '{"ok": false, "collect": "failed, see collect.log", "failed_steps": ['
      (IFS=,; printf '%s' "${names[*]}")
      printf '], "steps": '; cat "$OUT/steps.json"; printf '}\n'; } > "$OUT/summary.json"
  fi
  failed=1
fi
echo "summary: $OUT/summary.json ($(elapsed_s) s)"
exit $failed
