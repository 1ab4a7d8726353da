#!/usr/bin/env bash
# Train the embedded SD3-architecture model ("toy-sd3", issue 17 item 4): the UNet toy model's VAE (8×8×4 latent),
# a 5-block SD3 transformer (patch 1: 8×8 image tokens), two CLIP text encoders trained with it (the first started
# from the UNet toy model's), no T5. Runs 20-minute chunks of the trainer (each saves the state every 5 minutes and
# exports the pipeline to $CKPT/pipeline at its end) until the log says the training finished; safe to stop at any
# time and to start again (it resumes from $CKPT/state.pt).
#
#   setsid nohup scripts/train_sd3.sh > /dev/null 2>&1 &     # from the repository root; log: checkpoints/sd3/train.log
#   kill -- -"$(cat checkpoints/sd3/train_sd3.pid)"           # stop it (the whole process group)
#
# Environment: CKPT (default checkpoints/sd3), PYTHON (default .venv/bin/python), THREADS (default 1),
# EXTRA (more trainer options, appended: they win over the ones below; e.g. a tiny proof run:
#   CKPT=/tmp/sd3-proof EXTRA="--scenes 16 --steps 3 --batch 2 --width 32 --layers 2" scripts/train_sd3.sh).
set -u
cd "$(dirname "$0")/.."
CKPT=${CKPT:-checkpoints/sd3}
PYTHON=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-1}
EXTRA=${EXTRA:-}
LOG="$CKPT/train.log"
mkdir -p "$CKPT"
echo $$ > "$CKPT/train_sd3.pid"
export OMP_WAIT_POLICY=PASSIVE  # busy-waiting OpenMP threads slow everything else on a shared machine

# New-run options (--vae-from, --init-text, sizes) only act when the state does not exist yet; the rest are the
# same on every chunk, so the one command both starts and resumes the run.
# shellcheck disable=SC2206  # EXTRA is split into words on purpose
CHUNK=(-m promptcontrol.toy.train_sd3 --ckpt-dir "$CKPT" --vae-from promptcontrol/assets/toy-sd/vae
       --init-text promptcontrol/assets/toy-sd --scenes 30000 --steps 12000 --batch 64 --lr 5e-4 --warmup 300
       --ema 0.999 --seed 0 --threads "$THREADS" --minutes 20 --save-every 5 $EXTRA)

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
            rm -f "$CKPT/train_sd3.pid"
            exit 1
        fi
        sleep 60
    else
        failures=0
    fi
done
rm -f "$CKPT/train_sd3.pid"
