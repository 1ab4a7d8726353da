#!/usr/bin/env bash
# Train the sharper embedded model (issue 16): 32-px world, VAE ×2 (16×16×4 latent), UNet cross-attention at 16²
# and 8², UNet and text encoder started from the v2 model's weights. Runs 20-minute chunks of the trainer (each
# saves the state every 5 minutes and exports the pipeline at its end) until the log says the training finished;
# safe to stop at any time and to start again (it resumes from <ckpt-dir>/state.pt).
#
#   setsid nohup scripts/train_v3.sh > /dev/null 2>&1 &     # from the repository root; log: checkpoints/v3/train.log
#   kill -- -"$(cat checkpoints/v3/train_v3.pid)"             # stop it (the whole process group)
#
# Environment: CKPT (default checkpoints/v3), PYTHON (default .venv/bin/python), THREADS (default 1).
set -u
cd "$(dirname "$0")/.."
CKPT=${CKPT:-checkpoints/v3}
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-1}
LOG="$CKPT/train.log"
mkdir -p "$CKPT"
echo $$ > "$CKPT/train_v3.pid"
export OMP_WAIT_POLICY=PASSIVE  # busy-waiting OpenMP threads slow everything else on a shared machine

# New-run options (--vae-channels, --init-weights) only act when the state does not exist yet; the rest are the
# same on every chunk, so the one command both starts and resumes the run.
CHUNK=(-m promptcontrol.toy.train --ckpt-dir "$CKPT" --vae-channels 32,64 --init-weights promptcontrol/assets/toy-sd
       --vae-steps 1500 --scenes 30000 --steps 6000 --batch 96 --lr 5e-4 --warmup 300 --ema 0.999 --seed 0
       --threads "$THREADS" --minutes 20 --save-every 5)

failures=0
while true; do
    echo "=== chunk started $(date '+%Y-%m-%d %H:%M:%S') ===" >> "$LOG"
    nice -n 5 "$PYTHON" "${CHUNK[@]}" >> "$LOG" 2>&1
    rc=$?
    if tail -n 3 "$LOG" | grep -qE "training finished|training already finished"; then
        echo "=== done $(date '+%Y-%m-%d %H:%M:%S') ===" >> "$LOG"
        break
    fi
    if [ "$rc" -ne 0 ]; then
        failures=$((failures + 1))
        echo "=== chunk failed (exit $rc, $failures in a row) ===" >> "$LOG"
        if [ "$failures" -ge 3 ]; then
            echo "=== giving up after 3 failed chunks in a row: read the errors above, fix, start again ===" >> "$LOG"
            exit 1
        fi
        sleep 60
    else
        failures=0
    fi
done
rm -f "$CKPT/train_v3.pid"
