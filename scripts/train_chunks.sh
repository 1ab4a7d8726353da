#!/usr/bin/env bash
# Run a resumable trainer in 20-minute chunks until its log says the training finished (used by train_v3.sh and
# train_sd3.sh). Each chunk saves the state every 5 minutes and exports the pipeline at its end; safe to stop at
# any time (kill -- -"$(cat <ckpt>/<name>.pid)") and to start again (it resumes from <ckpt>/state.pt).
#
#   scripts/train_chunks.sh NAME CKPT_DIR TRAINER_MODULE [trainer options ...]
#
# Environment: PYTHON (default .venv/bin/python), THREADS (default 1), EXTRA (more trainer options, appended:
# they win over the script's, e.g. EXTRA="--until-step 3361").
set -u
cd "$(dirname "$0")/.."
NAME=$1; CKPT=$2; MODULE=$3; shift 3
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-1}
EXTRA=${EXTRA:-}
LOG="$CKPT/train.log"
PID="$CKPT/$NAME.pid"
mkdir -p "$CKPT"
echo $$ > "$PID"
export OMP_WAIT_POLICY=PASSIVE  # busy-waiting OpenMP threads slow everything else on a shared machine

failures=0
while true; do
    echo "=== chunk started $(date '+%Y-%m-%d %H:%M:%S') ===" >> "$LOG"
    # shellcheck disable=SC2086  # EXTRA is a list of options
    nice -n 5 "$PYTHON" -m "$MODULE" --ckpt-dir "$CKPT" "$@" --threads "$THREADS" --minutes 20 --save-every 5 \
        $EXTRA >> "$LOG" 2>&1
    rc=$?
    if tail -n 3 "$LOG" | grep -qE "training finished|training already finished"; then
        echo "=== done $(date '+%Y-%m-%d %H:%M:%S') ===" >> "$LOG"
        break
    fi
    until=$(sed -nE 's/.*--until-step[ =]([0-9]+).*/\1/p' <<< "$EXTRA")
    step=$(grep -oE "wrote pipeline to .* \(step [0-9]+\)" "$LOG" | tail -n 1 | grep -oE "[0-9]+\)$" | tr -d ')')
    if [ -n "$until" ] && [ -n "$step" ] && [ "$step" -ge "$until" ]; then
        echo "=== reached --until-step $until $(date '+%Y-%m-%d %H:%M:%S') ===" >> "$LOG"
        break
    fi
    if [ "$rc" -ne 0 ]; then
        failures=$((failures + 1))
        echo "=== chunk failed (exit $rc, $failures in a row) ===" >> "$LOG"
        if [ "$failures" -ge 3 ]; then
            echo "=== giving up after 3 failed chunks in a row: read the errors above, fix, start again ===" >> "$LOG"
            rm -f "$PID"
            exit 1
        fi
        sleep 60
    else
        failures=0
    fi
done
rm -f "$PID"
