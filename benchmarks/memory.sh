#!/usr/bin/env bash
# Model-state bytes per rank (params + grads + optimizer state) of DDP, ZeRO-1/2/3 and FSDP on 2 and 4 CPU
# ranks, GPT-2 124M's shape by default (see memory.py; extra arguments go to it, e.g. --n-layer 2).
# Usage: benchmarks/memory.sh [--n-layer N ...]      (needs dtrain importable: pip install -e . or PYTHONPATH)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DS_ACCELERATOR=cpu
lines="$(mktemp)"
for n in 2 4; do
  for run in "ddp" "zero1" "zero2" "zero3" "zero3 --precision bf16" "fsdp"; do
    python -m torch.distributed.run --nproc-per-node "$n" --master-addr 127.0.0.1 --master-port $((29600 + n)) \
      "$here/memory.py" --engine $run "$@" | grep '^{' >> "$lines"
  done
done
python "$here/memory.py" --table < "$lines"
rm -f "$lines"
