#!/usr/bin/env bash
# The GPU checks in one script, for a lent GPU machine (no network there). From the repo root:
#   PYTHONPATH=/tmp/site:$PWD OUT=$OUT bash tools/gpu_check.sh
# The project is not installed there: it runs as `python3 -m alexnet_pipe` from this folder. The
# host has torch, numpy, OpenCV, Pillow, matplotlib, scipy, tqdm, click, tensorboard and pytest
# (tools/gpu_host_packages.txt); /tmp/site holds the rest, DALI + lmdb + simplejpeg, from the
# offline bundle (shared/reference/tools/dali-offline-bundle.sh: 155 MB of xz, ~60-90 s to unpack).
# tests/gpu/test_gpu_host.py keeps every import of what runs here inside that set.
#
# Plan of seconds. The device is lent for 15 minutes, its start included, and the whole check with
# the unpacking must stay under 8 minutes: BUDGET_S=400 (default) + up to 60 s of unpacking (xz -T16
# of 155 MB: 5-10 s measured on 2 cores) leaves 20 s spare. RESERVE_S (20) is kept for nvidia-smi and the summary, and the steps' caps add up to
# BUDGET_S - RESERVE_S at most (tests/gpu/test_gpu_check.py sums them from this file), so no step is
# ever cut short by the budget, only by its own cap. Steps run in order of the value of what they
# report, so that a run that goes wrong late has already written the figures that matter most:
#   step            cap  what / why here
#   env              15  OUT/env.json: device, driver, CUDA, torch, DALI, lmdb, simplejpeg, git. First:
#                        seconds, and it says whether anything after it can work
#   data             20  a small synthetic dataset (720 JPEGs 500x375, drawn one process per class,
#                        short side 256, LMDB + RecordIO); every data step needs it
#   bench            25  the model step figures (the seed's method vs the same-run plain baseline):
#                        the headline table, needs no data
#   e2e              35  the DALI train pipeline feeding the model, and the pipeline alone against a
#                        PIL DataLoader (--loader): the data side's figure
#   levers           95  tools/gpu_levers.py: each lever toward 25,000 img/s against the same-run
#                        default -> OUT/levers.json (its --budget-s is the cap less 15 s of start-up;
#                        ~25 rows of a few seconds, then four compile rows of ~20 s each)
#   train            25  3 epochs of bf16 GPU training (LMDB): the whole path, and the weights below
#   gpu-tests        50  tests/gpu/test_gpu.py -> OUT/pytest.xml: pass/fail of the GPU paths, no figures
#   sweep            30  tools/dali_sweep.py: hw_decoder_load, DALI CPU threads, prefetch depth ->
#                        OUT/sweep.json (finer than levers; --budget-s is the cap less 12 s)
#   train-recordio   15  2 epochs from RecordIO
#   test             12  test with the trained weights (torch on the GPU)
#   predict          12  predict the val JPEGs with them
#   finetune         16  one epoch of --finetune --freeze conv from them
#   bench-compile    30  the benchmark with torch.compile: last, its compilation is the slowest
#                        step and the least certain; a cut or failed compile costs no other figure
#                  ----
#                   380  = BUDGET_S 400 - RESERVE_S 20
# On an H100/H200 each of these is mostly process start-up (torch + CUDA + DALI, 3-6 s), so each
# cap is about twice what the step is expected to take. A failed step does not stop the later ones
# unless they need its output (they are then "skipped"). Every step's output is kept in
# OUT/<step>.log; OUT/steps.json lists each step's status (ok / failed / timeout / skipped / na),
# exit code, seconds and note; OUT/summary.json gathers the steps and every figure. The script
# exits 1 when any step did not succeed ("na", not applicable in this mode, counts as success).
#
# BACKEND=cpu: the CPU rehearsal (tools/gpu_rehearsal.sh, `make gpu-rehearsal`). Every step runs
# with -b cpu on smaller work (120 training JPEGs, crop 112, small batches, 1 epoch), caps and
# budget x CAP_SCALE (default 6); env does not ask for CUDA; the GPU tests are collected and skip;
# bench-compile is "na" (inductor's CPU code is not the GPU's: its minutes prove nothing here).
# Each adaptation is the step's note in steps.json. It proves imports, packaging and the script on
# the host's package set, not figures.
# Knobs: BACKEND (gpu|cpu), PY (python), WORK (scratch), BUDGET_S, CAP_SCALE, and per-step caps
# (CAP_<STEP>, e.g. CAP_BENCH=60, in seconds after scaling; 0 turns a step off: "na").
set -uo pipefail
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
WORK=${WORK:-/tmp/alexnet-pipe-gpu}
BACKEND=${BACKEND:-gpu}
case $BACKEND in
  gpu) SCALE=${CAP_SCALE:-1} ;;
  cpu) SCALE=${CAP_SCALE:-6} ;;
  *) echo "BACKEND must be gpu or cpu, not $BACKEND" >&2; exit 2 ;;
esac
BUDGET_S=${BUDGET_S:-$((400 * SCALE))}
RESERVE_S=20  # kept back for nvidia-smi and the summary
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PY WORK OUT BACKEND
START_NS=$(date +%s%N)
declare -A STATUS NOTE
ENTRIES=()

# What each step runs, by mode. NOTE[step]: what CPU mode changed, recorded with the step.
if [[ $BACKEND == gpu ]]; then
  SHAPES=(64 8)  # per class: 640 train + 80 val JPEGs
  BENCH=()
  E2E=(--throughput-steps 20)
  TRAIN=(-z 128)
  TRAIN_EPOCHS=3 RECORDIO_EPOCHS=2
  SWEEP=()
else
  SHAPES=(12 4)
  BENCH=(-z 16 --crop 112 --iterations 3 --throughput-steps 2)
  E2E=(-z 16 --crop 112 --iterations 3 --throughput-steps 2)
  TRAIN=(-z 32 --crop 112)
  TRAIN_EPOCHS=1 RECORDIO_EPOCHS=1
  SWEEP=(--cpu --batch 32 --seconds 1 --warmup 1)
  NOTE[env]="CPU mode: CUDA not required"
  NOTE[data]="CPU mode: 120 train + 40 val JPEGs"
  NOTE[bench]="CPU mode: -b cpu, batch 16, crop 112, 3 iterations"
  NOTE[e2e]="CPU mode: -b cpu, batch 16, crop 112"
  NOTE[levers]="CPU mode: -b cpu"
  NOTE[train]="CPU mode: -b cpu f32, 1 epoch, batch 32, crop 112"
  NOTE[gpu-tests]="CPU mode: collected; they skip without a GPU"
  NOTE[sweep]="CPU mode: --cpu, batch 32, no hw_decoder_load rows"
  NOTE[train-recordio]="CPU mode: -b cpu, 1 epoch"
  NOTE[test]="CPU mode: -b cpu"
  NOTE[predict]="CPU mode: -b cpu"
  NOTE[finetune]="CPU mode: -b cpu"
fi
export SCALE TRAIN_EPOCHS RECORDIO_EPOCHS

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
  printf '{"backend": "%s", "budget_s": %s, "elapsed_s": %s, "steps": [%s]}\n' "$BACKEND" "$BUDGET_S" \
    "$(elapsed_s)" "${ENTRIES[*]}" > "$OUT/steps.json"
}

record() {  # record NAME STATUS RC SECONDS NOTE [CAP]
  STATUS[$1]=$2
  ENTRIES+=("{\"name\": $(json_str "$1"), \"status\": \"$2\", \"rc\": $3, \"seconds\": $4, \"cap_s\": ${6:-null}, \"log\": $(json_str "$OUT/$1.log"), \"note\": $(json_str "$5")}")
  printf '%-14s %-8s rc=%-4s %6ss  %s\n' "$1" "$2" "$3" "$4" "$5"
  write_steps
}

# na NAME REASON: a step that does not apply in this mode (counts as success).
na() { record "$1" na null 0 "$2"; }

# step NAME CAP_S NEEDS CMD...: run CMD under timeout (the smaller of CAP_S x SCALE and what the
# budget has left; exported to CMD as STEP_LIMIT_S), its output in OUT/NAME.log; skipped when the
# step NEEDS did not succeed or no time is left.
step() {
  local name=$1 cap=$(( $2 * SCALE )) needs=$3
  shift 3
  local var="CAP_${name^^}"
  var=${var//-/_}
  cap=${!var:-$cap}
  local note=${NOTE[$name]:-}
  if (( cap <= 0 )); then
    na "$name" "turned off ($var=$cap)"
    return
  fi
  if [[ -n $needs && ${STATUS[$needs]:-} != ok ]]; then
    record "$name" skipped null 0 "needs step $needs, which did not succeed" "$cap"
    return
  fi
  local left=$(( BUDGET_S - RESERVE_S - $(elapsed_s) ))
  if (( left < 10 )); then
    record "$name" skipped null 0 "time budget (BUDGET_S=$BUDGET_S) spent" "$cap"
    return
  fi
  local limit=$(( cap < left ? cap : left ))
  local t0=$(date +%s%N) rc
  STEP_LIMIT_S=$limit timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local secs=$(( ($(date +%s%N) - t0) / 1000000 ))
  secs=$(printf '%d.%03d' $((secs / 1000)) $((secs % 1000)))
  if (( rc == 0 )); then
    record "$name" ok "$rc" "$secs" "$note" "$cap"
  elif (( rc == 124 || rc == 137 )); then
    record "$name" timeout "$rc" "$secs" "killed after ${limit}s${note:+; $note}" "$cap"
  else
    record "$name" failed "$rc" "$secs" "$(tail -n 1 "$OUT/$name.log" | cut -c1-300)" "$cap"
  fi
}

# make_data TRAIN VAL: tools/make_shapes.py's image set (10 classes, 500x375) drawn one process per
# class (make_image_tree draws the same images for any subset of classes; single-threaded the 720
# JPEGs took 23 s on 2 cores, over the data cap), then converted to LMDB + RecordIO.
make_data() {
  local pids=() c rc=0
  for c in 0 1 2 3 4 5 6 7 8 9; do
    "$PY" -c 'import sys; from pathlib import Path; from alexnet_pipe.apps.synthetic import CLASSES, SynthConfig, make_image_tree
print(make_image_tree(SynthConfig(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), (500, 375), (CLASSES[int(sys.argv[4])],))))' \
      "$WORK/raw" "$1" "$2" "$c" &
    pids+=($!)
  done
  for c in "${pids[@]}"; do wait "$c" || rc=1; done
  (( rc == 0 )) || { echo "drawing the images failed"; return 1; }
  "$PY" -m alexnet_pipe convert "$WORK/raw" "$WORK/data" --format both --short-side 256 --no-progress
}
export -f make_data

timeout 10 nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
step env 15 "" "$PY" tools/gpu_summary.py env "$OUT" --backend "$BACKEND"
step data 20 "" bash -c 'make_data "$@"' data "${SHAPES[@]}"
step bench 25 "" "$PY" -m alexnet_pipe benchmark -b "$BACKEND" "${BENCH[@]}" -o "$OUT/bench.jsonl"
step e2e 35 data "$PY" -m alexnet_pipe benchmark -b "$BACKEND" -w "$WORK/data" --loader "$WORK/data" "${E2E[@]}" \
  -o "$OUT/bench.jsonl"
step levers 95 data bash -c '"$PY" tools/gpu_levers.py "$WORK/data" -o "$OUT/levers.json" -b "$BACKEND" \
  --budget-s $(( STEP_LIMIT_S > 30 ? STEP_LIMIT_S - 15 : STEP_LIMIT_S / 2 ))'
step train 25 data bash -c '"$PY" -m alexnet_pipe train -w "$WORK/data" -b "$BACKEND" -e "$TRAIN_EPOCHS" "$@" \
  --lr 0.003 --init kaiming --no-progress -s "$WORK/w.pt" -o "$OUT/train.jsonl"' train "${TRAIN[@]}"
step gpu-tests 50 "" "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu/test_gpu.py --junitxml="$OUT/pytest.xml"
step sweep 30 data bash -c '"$PY" tools/dali_sweep.py "$WORK/data" -o "$OUT/sweep.json" "$@" \
  --budget-s $(( STEP_LIMIT_S > 24 ? STEP_LIMIT_S - 12 : STEP_LIMIT_S / 2 ))' sweep "${SWEEP[@]}"
step train-recordio 15 data bash -c '"$PY" -m alexnet_pipe train -w "$WORK/data" -b "$BACKEND" -e "$RECORDIO_EPOCHS" \
  "$@" --reader recordio --no-progress -o "$OUT/train-recordio.jsonl"' train "${TRAIN[@]}"
step test 12 train "$PY" -m alexnet_pipe test -w "$WORK/data" -b "$BACKEND" --model-file "$WORK/w.pt" --no-progress \
  -o "$OUT/test.jsonl"
step predict 12 train bash -c '"$PY" -m alexnet_pipe predict --model-file "$WORK/w.pt" -b "$BACKEND" --json \
  "$WORK/raw/val" > "$OUT/predict.json"'
step finetune 16 train bash -c '"$PY" -m alexnet_pipe train -w "$WORK/data" -b "$BACKEND" -e 1 "$@" \
  --model-file "$WORK/w.pt" --finetune --freeze conv --no-progress -s "$WORK/ft.pt" -o "$OUT/finetune.jsonl"' \
  finetune "${TRAIN[@]}"
if [[ $BACKEND == gpu ]]; then
  step bench-compile 30 "" "$PY" -m alexnet_pipe benchmark -b gpu --compile -o "$OUT/bench.jsonl"
else
  na bench-compile "CPU mode: torch.compile is timed on the GPU only"
fi

failed=0
for e in "${ENTRIES[@]}"; do [[ $e == *'"status": "ok"'* || $e == *'"status": "na"'* ]] || failed=1; done
if ! timeout 15 "$PY" tools/gpu_summary.py collect "$OUT" > "$OUT/collect.log" 2>&1 || [[ ! -s $OUT/summary.json ]]; then
  if [[ ! -s $OUT/summary.json ]] || ! grep -q '"failed_steps"' "$OUT/summary.json"; then
    # no Python to merge the figures: the steps alone, so that the summary always exists
    names=()
    for e in "${ENTRIES[@]}"; do
      [[ $e == *'"status": "ok"'* || $e == *'"status": "na"'* ]] ||
        names+=("$(sed -E 's/^\{"name": ("[^"]*").*/\1/' <<< "$e")")
    done
    { printf '{"ok": false, "collect": "failed, see collect.log", "failed_steps": ['
      (IFS=,; printf '%s' "${names[*]}")
      printf '], "steps": '; cat "$OUT/steps.json"; printf '}\n'; } > "$OUT/summary.json"
  fi
  failed=1
fi
echo "summary: $OUT/summary.json ($(elapsed_s) s)"
exit $failed
