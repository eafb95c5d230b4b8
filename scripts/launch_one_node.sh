#!/usr/bin/env bash
# One node, all its GPUs: ViT-B-32 at CLIP's 32,768 global batch on 8 GPUs
# (256 per GPU x accum-freq 16 x 8 GPUs). The '--' keeps torchrun from reading our
# --logs as an abbreviation of its own --logs-specs.
set -euo pipefail
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
torchrun --standalone --nproc-per-node "$GPUS" -m bigbatch -- train \
    --train-data '/data/laion/{000000..041455}.tar' --train-num-samples 400000000 \
    --model ViT-B-32 --batch-size 256 --accum-freq $((32768 / (256 * GPUS))) \
    --local-loss --gather-with-grad --precision amp_bf16 \
    --lr 5e-4 --wd 0.2 --warmup 2000 --epochs 32 --workers 8 \
    --logs ./logs --name vit-b-32-32k "$@"
