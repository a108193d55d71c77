#!/usr/bin/env bash
# One node: one worker per local GPU, or NPROC CPU ranks (gloo).
#
#   launch/single_node.sh [NPROC] [-- dtrain train args]
#   launch/single_node.sh [NPROC] -- train.py [its args]   # a script of your own that calls dtrain.main
#   launch/single_node.sh -- --config configs/digits.yaml         # every visible GPU (1 rank without GPUs)
#   launch/single_node.sh 2 -- --config configs/digits.yaml optim.lr=0.01
#
# NPROC defaults to the number of visible GPUs (CUDA_VISIBLE_DEVICES respected), else 1.
# `dtrain launch` (torch's elastic agent, as torchrun --standalone) picks a free port itself, so several
# runs can share the node; rank 0's output on the terminal, every rank's in runs/<name>/logs/rank-N.log.
# Env: PYTHON (default python3), MAX_RESTARTS (default 0: restart all workers from the newest
# checkpoint after a crashed or killed worker, at most this many times).
set -euo pipefail

usage() { echo "usage: $0 [NPROC] [-- dtrain train args]" >&2; exit 2; }

PYTHON=${PYTHON:-python3}
nproc=
if [ $# -gt 0 ] && [ "$1" != "--" ]; then nproc=$1; shift; fi
if [ $# -gt 0 ]; then [ "$1" = "--" ] || usage; shift; fi
[ "${1:-}" = "train" ] && shift  # `-- train ...` and `-- ...` mean the same

if [ -z "$nproc" ]; then
  nproc=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  if [ "$nproc" = 0 ]; then
    nproc=1
    echo "launch/single_node.sh: no GPU visible; 1 CPU rank (give NPROC for more)" >&2
  fi
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "launch/single_node.sh: NPROC must be a positive integer, got '$nproc'" >&2; usage; }

# A script of your own that calls dtrain.main (its path first) runs with the rest; else `dtrain train` does.
if [[ "${1:-}" == *.py ]]; then run=("$@"); else run=(train "$@"); fi
cmd=("$PYTHON" -m dtrain launch --nproc-per-node "$nproc" --max-restarts "${MAX_RESTARTS:-0}" "${run[@]}")
{ printf +; printf ' %q' "${cmd[@]}"; echo; } >&2
exec "${cmd[@]}"
