#!/usr/bin/env bash
# Several nodes: run this on every node with NODE_RANK=0..NNODES-1 and MASTER=<node 0's host>.
# Effective batch = batch-size x accum-freq x (NNODES x GPUS_PER_NODE).
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER:?set MASTER to node 0 host}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER:29500" --rdzv-id bigbatch \
    -m bigbatch -- train --config configs/vit-b-32-pretrain.yaml "$@"
