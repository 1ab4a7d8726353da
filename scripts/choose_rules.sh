#!/usr/bin/env bash
# Choose the map rule and the local-blend rule of `promptcontrol evaluate` from measurement, on TUNING prompt sets
# that no reported number uses (issue 16): map captions eval_samples(16, 5151) (`--seed 5151`), blend scenes
# world.dataset(4, 3030) generated + world.dataset(2, 3031) inverted (`--seed-offset 1006 --quick`). Reported
# numbers then use fresh sets (`--seed-offset 7000`, see docs/embedded-model.md).
#
#   scripts/choose_rules.sh [MODEL_FOLDER] [OUT_DIR]     # default: the embedded model, runs/choose-rules
set -u
cd "$(dirname "$0")/.."
MODEL=${1:-}
OUT=${2:-runs/choose-rules}
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
model=(); [ -n "$MODEL" ] && model=(--model "$MODEL")
ev() { "$PYTHON" -m promptcontrol evaluate "${model[@]}" --quiet "$@"; }

{
echo "# map rules, eval_samples(16, 5151)"
ev --only maps --seed 5151 --maps-by-level | grep -E "map|settings"
for rule in "--map-sites all --map-weighting level" "--map-sites all --map-weighting resolution" \
            "--map-sites all --map-weighting layer" "--map-sites down:0 up:0 --map-weighting level"; do
    echo "## $rule"
    ev --only maps --seed 5151 $rule | grep -E "noun map|adjective map|own object|prefers"
done
echo "# blend rules, world.dataset(4, 3030) generated, world.dataset(2, 3031) inverted"
for levels in default "0 1" "0"; do
    for thr in 0.3 0.4 0.5 0.6; do
        lv=(); [ "$levels" != default ] && lv=(--blend-levels $levels)
        echo "## threshold $thr levels $levels"
        ev --only blend --quick --seed-offset 1006 --blend-threshold "$thr" "${lv[@]}" | grep -E "blend|reconstruction"
    done
done
} 2>&1 | tee "$OUT/rules.md"
