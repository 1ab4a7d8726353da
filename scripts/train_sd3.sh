#!/usr/bin/env bash
# Train the embedded SD3-architecture model ("toy-sd3", issue 17 item 4): toy-sd3's VAE (the v2 UNet toy model's,
# 8×8×4 latent), a 5-block SD3 transformer (patch 1: 8×8 image tokens), two CLIP text encoders trained with it (the
# first started from the v2 UNet toy model's), no T5. 20-minute resumable chunks (scripts/train_chunks.sh) until
# the log says the training finished.
#
#   setsid nohup scripts/train_sd3.sh > /dev/null 2>&1 &     # from the repository root; log: checkpoints/sd3/train.log
#   kill -- -"$(cat checkpoints/sd3/train_sd3.pid)"           # stop it (the whole process group)
#
# Environment: CKPT (default checkpoints/sd3), INIT_TEXT (default checkpoints/v2: the v2 UNet toy model's folder,
# see docs/embedded-model.md "Reproducing"; only read by a new run), PYTHON, THREADS (default 1), EXTRA (more
# trainer options, appended: they win; e.g. EXTRA="--until-step 3361", or a tiny proof run:
#   CKPT=/tmp/sd3-proof EXTRA="--scenes 16 --steps 3 --batch 2 --width 32 --layers 2" scripts/train_sd3.sh).
cd "$(dirname "$0")/.."
exec scripts/train_chunks.sh train_sd3 "${CKPT:-checkpoints/sd3}" promptcontrol.toy.train_sd3 \
    --vae-from promptcontrol/assets/toy-sd3/vae --init-text "${INIT_TEXT:-checkpoints/v2}" --scenes 30000 \
    --steps 12000 --batch 64 --lr 5e-4 --warmup 300 --ema 0.999 --seed 0
