#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine lacks, for benchmarks/gpu.sh to install there offline.
#
# The device (nvidia-h200: Python 3.12, CUDA torch 2.11, transformers 5.17, accelerate, safetensors, numpy,
# matplotlib, tqdm, huggingface-hub 1.33, filelock, regex, requests, pillow, zipp) reaches no registry and has no
# diffusers. So: diffusers at the version installed here, the Requires-Dist of diffusers it lacks
# (importlib_metadata, and lazy-importer which that needs), and promptcontrol itself as a wheel built from the
# working tree as it is now. One version of each (two stop the whole install there). Prints each size and what
# the device tool would send (working tree + .whl, limit 64 MiB).
#
#   bash scripts/gpu_wheels.sh            # then, with the device tool: run  bash benchmarks/gpu.sh  carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY=${VENV_PY:-.venv/bin/python}  # the environment whose diffusers version is the one to ship
PIP_PY=${PIP_PY:-$VENV_PY}
DEST=.whl
LIMIT_MIB=64

git check-ignore -q "$DEST/" || { echo "error: $DEST/ is not git-ignored; add '/$DEST/' to .gitignore" >&2; exit 1; }
pip_quietly() {  # pip, silent when it works; its whole output when it fails
  local log rc=0
  log=$(mktemp)
  "$PIP_PY" -m pip "$@" >"$log" 2>&1 || rc=$?
  ((rc == 0)) || cat "$log" >&2
  rm -f "$log"
  return $rc
}
travelling() {  # files that travel (tracked and untracked-not-ignored, still present), NUL-separated
  git ls-files -z --cached --others --exclude-standard -- "$@" \
    | while IFS= read -r -d '' f; do [[ -f $f ]] && printf '%s\0' "$f"; done
}
version() { "$VENV_PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
DIFFUSERS=$(version diffusers)
# Requires-Dist of diffusers (no extras) that the device's package list lacks; the rest is there.
MISSING_DEPS=("importlib_metadata==$(version importlib_metadata)" "lazy-importer==$(version lazy-importer)")

rm -rf "$DEST" && mkdir -p "$DEST"
echo "downloading diffusers==$DIFFUSERS ${MISSING_DEPS[*]} for cp312 manylinux x86_64"
pip_quietly download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "diffusers==$DIFFUSERS" "${MISSING_DEPS[@]}"

# The package from the working tree (others' uncommitted edits included, as they travel), built in a scratch copy
# so that no build/ or *.egg-info is left in the tree.
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
travelling pyproject.toml README.md promptcontrol | xargs -0 cp --parents -t "$SRC"
pip_quietly wheel -q --no-deps --no-build-isolation -w "$DEST" "$SRC"
ls "$DEST"/promptcontrol-*.whl >/dev/null || { echo "error: the promptcontrol wheel was not built" >&2; exit 1; }

# diffusers' own requirements (no extras), to see each is either shipped here or on the device's list.
echo "diffusers Requires-Dist (extras skipped):"
unzip -p "$DEST"/diffusers-*.whl '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/  /'
echo "wheels in $DEST/:"
du -b "$DEST"/*.whl | awk '{printf "  %8.2f MiB  %s\n", $1 / 1048576, $2}'
WHEELS=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
TREE=$(travelling | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
awk -v w="$WHEELS" -v t="$TREE" -v l="$LIMIT_MIB" 'BEGIN {
  printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB travelling (limit %d MiB)\n", w/1048576, t/1048576, (w+t)/1048576, l
  if ((w + t) / 1048576 > 0.8 * l) { print "error: less than 20% margin under the limit" > "/dev/stderr"; exit 1 } }'
