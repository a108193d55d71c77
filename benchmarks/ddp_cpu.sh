#!/usr/bin/env bash
# CPU DDP throughput, 1 vs 2 ranks, digits and count: dtrain vs a hand-written DDP loop (see ddp_cpu.py).
# Usage: benchmarks/ddp_cpu.sh [--steps N --reps N]    (needs dtrain importable: pip install -e . or PYTHONPATH)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
lines="$(mktemp)"
for n in 1 2; do
  python -m torch.distributed.run --nproc-per-node "$n" --master-addr 127.0.0.1 --master-port $((29500 + n)) \
    "$here/ddp_cpu.py" "$@" >> "$lines"
done
python "$here/ddp_cpu.py" --table < "$lines"
rm -f "$lines"
