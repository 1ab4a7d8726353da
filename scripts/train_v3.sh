#!/usr/bin/env bash
# Train the embedded UNet model v3 (issue 16, shipped in promptcontrol/assets/toy-sd): 32-px world, VAE ×2
# (16×16×4 latent), UNet cross-attention at 16² and 8², UNet and text encoder started from the v2 model's weights.
# 20-minute resumable chunks (scripts/train_chunks.sh) until the log says the training finished.
#
#   setsid nohup scripts/train_v3.sh > /dev/null 2>&1 &     # from the repository root; log: checkpoints/v3/train.log
#   kill -- -"$(cat checkpoints/v3/train_v3.pid)"             # stop it (the whole process group)
#
# Environment: CKPT (default checkpoints/v3), INIT (default checkpoints/v2: the v2 model's folder, see
# docs/embedded-model.md "Reproducing"; only read by a new run), PYTHON, THREADS (default 1), EXTRA (more trainer
# options, appended: they win; the shipped weights: EXTRA="--until-step 4774").
cd "$(dirname "$0")/.."
exec scripts/train_chunks.sh train_v3 "${CKPT:-checkpoints/v3}" promptcontrol.toy.train \
    --vae-channels 32,64 --init-weights "${INIT:-checkpoints/v2}" --vae-steps 1500 --scenes 30000 --steps 6000 \
    --batch 96 --lr 5e-4 --warmup 300 --ema 0.999 --seed 0
