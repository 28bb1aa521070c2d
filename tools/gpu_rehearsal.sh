#!/usr/bin/env bash
# Rehearse tools/gpu_check.sh on the CPU in the GPU host's package set: `make gpu-rehearsal`.
#
# Builds (once, cached in .rehearsal/, ignored by git) a Python 3.12 venv holding only what the lent
# GPU host has that the project or the bundle uses (tools/gpu_host_packages.txt: torch, numpy,
# OpenCV headless, Pillow, matplotlib, scipy, tqdm, click, tensorboard, pytest, and six, wheel,
# packaging, pyyaml, typing-extensions for DALI) and NOT lmdb, simplejpeg or DALI; makes the offline
# bundle (../shared/reference/tools/dali-offline-bundle.sh, ~2 min, ~155 MB) unless BUNDLE has it;
# unpacks it as the host does (cat chunks | xz -d | tar x) into a fresh SITE; then runs
#   PYTHONPATH=$SITE:$PWD PY=<venv python> BACKEND=cpu bash tools/gpu_check.sh
# with the project un-installed, and prints OUT/steps.json. Exit status: gpu_check.sh's.
# Knobs: PY312 (a Python 3.12), TORCH (pip spec, default torch==2.13.0: no local 3.12 CPU build
# exists on these machines, so pip takes PyPI's CUDA 13 build, ~4 GB with its nvidia-* wheels, which
# runs on the CPU as the host's does on its GPU), REHEARSAL (cache folder), BUNDLE, SITE, OUT, WORK,
# and anything gpu_check.sh reads (CAP_SCALE, CAP_<STEP>, BUDGET_S).
set -euo pipefail
cd "$(dirname "$0")/.."
REHEARSAL=${REHEARSAL:-.rehearsal}
if [[ -z ${PY312:-} ]]; then  # pyenv's 3.12 (its shim may point at another version), else python3.12
  for PY312 in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 "$(command -v python3.12 || true)"; do
    [[ -x $PY312 ]] && "$PY312" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && break
  done
fi
TORCH=${TORCH:-torch==2.13.0}
BUNDLE=${BUNDLE:-.dalibundle}
SITE=${SITE:-$REHEARSAL/site}
OUT=${OUT:-$REHEARSAL/out}
WORK=${WORK:-$REHEARSAL/work}
BUNDLE_SCRIPT=${BUNDLE_SCRIPT:-../shared/reference/tools/dali-offline-bundle.sh}
# What the host has and the project (or the bundle, [bundle-needs]) uses; nothing else.
HOST_PKGS=(numpy opencv-python-headless pillow matplotlib scipy tqdm click tensorboard pytest
           six wheel packaging pyyaml typing-extensions)

venv=$REHEARSAL/venv-${TORCH//[^A-Za-z0-9.]/_}
stamp="$TORCH ${HOST_PKGS[*]}"
if [[ ! -f $venv/.installed || $(cat "$venv/.installed") != "$stamp" ]]; then
  "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' ||
    { echo "PY312=$PY312 is not Python 3.12 (the GPU host's)" >&2; exit 2; }
  echo "== building $venv ($TORCH + the host's packages; several minutes the first time)"
  rm -rf "$venv"
  "$PY312" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$TORCH" "${HOST_PKGS[@]}"
  echo "$stamp" > "$venv/.installed"
fi
PYV=$PWD/$venv/bin/python
for m in lmdb simplejpeg nvidia.dali alexnet_pipe; do  # only the bundle and the checkout may bring these
  if (cd / && env -u PYTHONPATH "$PYV" -c "import $m" 2>/dev/null); then
    echo "$venv can import $m without the bundle: not the host's package set" >&2; exit 2
  fi
done

if ! compgen -G "$BUNDLE/part*/chunk_*" > /dev/null; then
  echo "== making the offline bundle in $BUNDLE (about 2 minutes)"
  bash "$BUNDLE_SCRIPT" "$BUNDLE"
fi
echo "== unpacking $BUNDLE into $SITE, as the host does"
rm -rf "$SITE" && mkdir -p "$SITE"
t0=$(date +%s)
cat "$BUNDLE"/part*/chunk_* | xz -d -T2 | tar x -C "$SITE"
echo "unpacked in $(( $(date +%s) - t0 )) s: $(du -sh "$SITE" | cut -f1)"

echo "== tools/gpu_check.sh, BACKEND=cpu, Python $("$PYV" -c 'import platform, torch; print(platform.python_version(), "torch", torch.__version__)')"
rm -rf "$OUT" "$WORK"
rc=0
PYTHONPATH=$PWD/$SITE:$PWD PY=$PYV BACKEND=cpu OUT=$OUT WORK=$WORK bash tools/gpu_check.sh || rc=$?
"$PYV" - "$OUT/steps.json" <<'EOF'
import json, sys
steps = json.load(open(sys.argv[1]))
print(f"\nsteps.json ({steps['backend']}, {steps['elapsed_s']} s of a {steps['budget_s']} s budget):")
for s in steps["steps"]:
    print(f"  {s['name']:<15} {s['status']:<8} {s['seconds']:>8} s  cap {s.get('cap_s')}  {s['note'][:90]}")
EOF
exit $rc
