#!/usr/bin/env bash
# The GPU run (issue 20) as one command for a bare CUDA machine that reaches no package registry.
#
#   here, once:      bash scripts/gpu_wheels.sh            # diffusers + its missing deps + this package → .whl/
#   device tool:     run  command="bash benchmarks/gpu.sh"  carry=[".whl"]  timeout_s=540
#   any CUDA box:    bash benchmarks/gpu.sh                 # results in benchmarks/results/ ($OUT when set)
#   this CPU:        bash benchmarks/gpu.sh --cpu-dry-run   # or GPU_DRY_RUN=1: the same sequence, tiny models, ~2 min
#
# Installs .whl/*.whl into a scratch --target (PYTHONPATH), prints versions and nvidia-smi, then runs, each part
# bounded by `timeout` and all together by GPU_BUDGET_S (default 420 s, 7 min: the device allows 10 a command):
#   1. python -m benchmarks.run --gpu: SD 1.5 at 512² and SDXL at 1024², fp16, batch 2 with CFG (4 for edits);
#      UNets of the published configs with random weights (benchmarks/models.py: no hub there, timing does not
#      depend on weights), 10 denoising steps per timed call, 4 interleaved rounds after 1 warm-up;
#   2. python -m benchmarks.sync_check: every mode with torch.cuda.set_sync_debug_mode("error") inside each UNet
#      call and sync counts over the whole call (tiny pipelines and SD 1.5 at 512²);
#   3. the host-cost "dispatch" case, if benchmarks/run.py offers it (issue 19), else a line saying it is absent;
#   4. the SD3-medium architecture transformer, 24 blocks at 1024² fp16 (--only sd3 --gpu; issue 17 item 6),
#      then the Flux.1-dev architecture transformer, 19 + 38 blocks at 1024² bf16 (--only flux --gpu; issue 18);
#   5. compiled (inductor, fullgraph) vs eager on SD 1.5 at 512²: stock, pass-through, reweight, Replace edit.
#      Last, because compiling is the least predictable part: a time-out there loses only its own table.
# Writes run-, sync-check-, compile-, sd3-, flux- (and dispatch-) .md/.json and gpu.log. Under $OUT (the device
# tool brings back 8 files at most) the .json files go into one results-json.tar.gz when there would be more than 8.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

DRY=${GPU_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) DRY=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$arg' (use --cpu-dry-run, or none)" >&2; exit 2 ;;
  esac
done

if ((DRY)); then  # this CPU: the venv runs, the local python3 installs (pure-Python wheels, as on the device)
  PY=${PYTHON:-.venv/bin/python}
  PIP_PY=${PIP_PYTHON:-python3}
  BUDGET=${GPU_BUDGET_S:-170}
  RESULTS=${OUT:-$(mktemp -d /tmp/gpu-dry-run.XXXXXX)}
  SUFFIX=cpu-float32
  TABLE=(--models tiny-sd15:64 tiny-sdxl:64 --repeats 1 --warmup 0)
  SYNC=(--models tiny-sd15 tiny-sdxl --steps 2)
  DISPATCH=(--models tiny-sd15:64 --repeats 1)
  COMPILE=(--models tiny-sd15:64 --compile eager --repeats 1)  # dynamo tracing only: inductor is minutes here
  SD3=(--tiny --repeats 1)
  FLUX=(--tiny --repeats 1)
  #       part: cap  expected (seconds)
  PLAN=(install:60:10 table:60:25 sync:45:15 dispatch:30:10 compile:90:35 sd3:45:10 flux:45:10)
else
  PY=${PYTHON:-python3}
  PIP_PY=${PIP_PYTHON:-$PY}
  BUDGET=${GPU_BUDGET_S:-420}
  RESULTS=${OUT:-benchmarks/results}
  SUFFIX=cuda-float16
  TABLE=(--gpu --repeats 4)
  SYNC=(--models tiny-sd15 tiny-sdxl sd15:512 --steps 3)
  DISPATCH=(--gpu)
  COMPILE=(--gpu --models sd15:512 --compile inductor --repeats 4)
  SD3=(--gpu --repeats 3)  # the SD3-medium architecture, 24 blocks, 1024², fp16 (issue 17 item 6)
  FLUX=(--gpu --repeats 3)  # the Flux.1-dev architecture, 19 + 38 blocks, 1024², bf16: 24 GB of weights (issue 18)
  PLAN=(install:60:15 table:180:120 sync:60:25 dispatch:45:20 compile:150:120 sd3:120:60 flux:120:60)
fi
COMPILE+=(--only stock pass-through reweight "edit: Replace + self injection,")  # eager and compiled of each

mkdir -p "$RESULTS"
SITE=$(mktemp -d /tmp/gpu-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT  # nothing stays installed
exec > >(tee -a "$RESULTS/gpu.log") 2>&1
START=$SECONDS
FAILED=0
DONE=()

cap_of() { local p; for p in "${PLAN[@]}"; do [[ ${p%%:*} == "$1" ]] && { p=${p#*:}; echo "${p%%:*}"; }; done; }
expected_of() { local p; for p in "${PLAN[@]}"; do [[ ${p%%:*} == "$1" ]] && echo "${p##*:}"; done; }

part() {  # part NAME COMMAND...: run under min(the part's cap, what is left of the budget)
  local name=$1; shift
  local cap left t0 rc=0 verdict=ok
  cap=$(cap_of "$name")
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 10)); then
    DONE+=("$name: skipped, ${left}s left of the ${BUDGET}s budget"); FAILED=1; return 1
  fi
  ((cap > left)) && cap=$left
  echo; echo "=== $name (cap ${cap}s, expected ~$(expected_of "$name")s): $*"
  t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" || rc=$?
  if ((rc == 124 || rc == 137)); then verdict="TIMED OUT at ${cap}s"; elif ((rc)); then verdict="exit $rc"; fi
  ((rc)) && FAILED=1
  DONE+=("$name: $verdict, $((SECONDS - t0))s")
  echo "=== $name: $verdict after $((SECONDS - t0))s ($((SECONDS - START))s of ${BUDGET}s used)"
  return $rc
}

VERSIONS_PY='
import os, platform, sys
import torch, diffusers, transformers, accelerate, huggingface_hub, safetensors, numpy, promptcontrol
site = os.environ["GPU_SITE"]
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
for module in (diffusers, transformers, accelerate, huggingface_hub, safetensors, numpy, promptcontrol):
    where = "wheel" if module.__file__.startswith(site) else "installed"
    version = getattr(module, "__version__", "?")
    print(f"{module.__name__} {version} ({where}: {os.path.dirname(module.__file__)})")
assert diffusers.__file__.startswith(site) and promptcontrol.__file__.startswith(site), "not the carried wheels"
'

echo "gpu.sh $( ((DRY)) && echo "--cpu-dry-run " )at $(date -u +%FT%TZ) on $(hostname), tree $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)') + $(git status --short 2>/dev/null | wc -l) changed file(s); results in $RESULTS"
echo "time budget ${BUDGET}s in all (part: cap / expected):"
for p in "${PLAN[@]}"; do IFS=: read -r n c e <<<"$p"; printf '  %-9s %4ss / ~%ss\n' "$n" "$c" "$e"; done

shopt -s nullglob
WHEELS=(.whl/*.whl)
for name in diffusers promptcontrol; do
  found=(.whl/"$name"-*.whl)
  if ((${#found[@]} != 1)); then
    echo "gpu.sh: need exactly one $name wheel in .whl/, found ${#found[@]}: run 'bash scripts/gpu_wheels.sh' where pip" \
      "reaches an index, then carry .whl (device tool: carry=[\".whl\"])" >&2
    exit 1
  fi
done
part install "$PIP_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "${WHEELS[@]}" || { echo "gpu.sh: installing the wheels failed (see above); nothing else can run" >&2; exit 1; }
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} GPU_SITE=$SITE
"$PY" -P -c "$VERSIONS_PY" || { echo "gpu.sh: the carried wheels do not import (see above)" >&2; exit 1; }
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not here (no NVIDIA driver)"; fi

part table "$PY" -m benchmarks.run "${TABLE[@]}" --out "$RESULTS/run"
part sync "$PY" -m benchmarks.sync_check "${SYNC[@]}" --out "$RESULTS/sync-check"
if "$PY" -m benchmarks.run --help | grep -qi dispatch; then
  part dispatch "$PY" -m benchmarks.run "${DISPATCH[@]}" --only dispatch --out "$RESULTS/dispatch"
else
  echo; echo "=== dispatch: absent — benchmarks/run.py --help names no dispatch case yet (issue 19)"
  DONE+=("dispatch: absent from benchmarks/run.py (issue 19)")
fi
part sd3 "$PY" -m benchmarks.run --only sd3 "${SD3[@]}" --out "$RESULTS/sd3"
part flux "$PY" -m benchmarks.run --only flux "${FLUX[@]}" --out "$RESULTS/flux"
if part compile "$PY" -m benchmarks.run "${COMPILE[@]}" --out "$RESULTS/compile"; then
  "$PY" - "$RESULTS/compile-$SUFFIX.json" <<'EOF'
import json, sys
tables = json.load(open(sys.argv[1]))["tables"]
for table in tables:  # each mode's eager median over its compiled median, groups and rows paired in order
    groups = {}
    for row in table["results"]:
        groups.setdefault(row["group"], []).append(row)
    eager = [rows for group, rows in groups.items() if not group.startswith("compiled")]
    compiled = [rows for group, rows in groups.items() if group.startswith("compiled")]
    print(f"compiled speed-up over eager, {table['model']} at {table['size']}² (eager median / compiled median):")
    for eager_rows, compiled_rows in zip(eager, compiled):
        for e, c in zip(eager_rows, compiled_rows):
            print(f"  {e['median_s'] / c['median_s']:5.2f}x  {e['name']}  ->  {c['name']}")
EOF
fi


if [[ -n ${OUT:-} ]]; then  # the device tool brings back 8 files at most
  files=("$OUT"/*)
  if ((${#files[@]} > 8)); then
    (cd "$OUT" && tar czf results-json.tar.gz ./*.json && rm ./*.json) && echo "packed the .json files into results-json.tar.gz"
  fi
fi
echo; echo "=== summary ($((SECONDS - START))s of ${BUDGET}s):"
for line in "${DONE[@]}"; do echo "  $line"; done
ls -l "$RESULTS" | sed 's/^/  /'
((DRY)) && echo "dry run: CPU, tiny models — no GPU figure; delete $RESULTS when done"
exit $FAILED
