#!/usr/bin/env bash
# Several nodes: run this once on every node; `dtrain launch`'s c10d rendezvous (torch's elastic agent,
# as torchrun's) on the head node joins them.
#
#   launch/multi_node.sh --nnodes N --node-rank R --head HOST[:PORT] [--nproc P] [--run-id ID] [-- dtrain train args]
#   launch/multi_node.sh ... -- train.py [its args]   # a script of your own that calls dtrain.main
#
#   head$  launch/multi_node.sh --nnodes 2 --node-rank 0 --head head01:29400 -- --config configs/digits.yaml
#   other$ launch/multi_node.sh --nnodes 2 --node-rank 1 --head head01:29400 -- --config configs/digits.yaml
#
# Each option falls back to an environment variable: NNODES, NODE_RANK, HEAD_ADDR (else MASTER_ADDR),
# HEAD_PORT (else MASTER_PORT, else 29400), NPROC_PER_NODE (else the visible GPUs, else 1),
# RDZV_ID (default dtrain: every node of one job must use the same id), RDZV_TIMEOUT (s, default 300:
# how long the nodes wait for each other, dtrain launch's --rdzv-timeout), MAX_RESTARTS (default 0: restarts of all workers after a
# crashed or killed one, from the newest checkpoint). PYTHON (default python3).
#
# Node rank 0 must run on HEAD: it hosts the rendezvous store (is_host=1). The c10d rendezvous then
# assigns the global ranks itself, so node rank R need not end up holding ranks R*P..R*P+P-1.
set -euo pipefail

usage() { echo "usage: $0 --nnodes N --node-rank R --head HOST[:PORT] [--nproc P] [--run-id ID] [-- dtrain train args]" >&2; exit 2; }
die() { echo "launch/multi_node.sh: $*" >&2; usage; }

PYTHON=${PYTHON:-python3}
nnodes=${NNODES:-}
node_rank=${NODE_RANK:-}
head=${HEAD_ADDR:-${MASTER_ADDR:-}}
port=${HEAD_PORT:-${MASTER_PORT:-29400}}
nproc=${NPROC_PER_NODE:-}
run_id=${RDZV_ID:-dtrain}
while [ $# -gt 0 ]; do
  case $1 in
    --nnodes) nnodes=${2:-}; shift 2 ;;
    --node-rank) node_rank=${2:-}; shift 2 ;;
    --head) head=${2:-}; shift 2 ;;
    --port) port=${2:-}; shift 2 ;;
    --nproc) nproc=${2:-}; shift 2 ;;
    --run-id) run_id=${2:-}; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) die "unknown option '$1' (dtrain's own arguments go after --)" ;;
  esac
done
[ "${1:-}" = "train" ] && shift

if [[ "$head" == *:* ]]; then port=${head##*:}; head=${head%:*}; fi
[ -n "$head" ] || die "no head address: give --head HOST[:PORT] (or HEAD_ADDR)"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "--nnodes (or NNODES) must be a positive integer, got '$nnodes'"
[[ "$node_rank" =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nnodes" ] \
  || die "--node-rank (or NODE_RANK) must be in 0..$((nnodes - 1)), got '$node_rank'"
[[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -gt 0 ] && [ "$port" -lt 65536 ] || die "port must be 1-65535, got '$port'"
if [ -z "$nproc" ]; then
  nproc=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc (or NPROC_PER_NODE) must be a positive integer, got '$nproc'"

is_host=0
[ "$node_rank" = 0 ] && is_host=1
# A script of your own that calls dtrain.main (its path first) runs with the rest; else `dtrain train` does.
if [[ "${1:-}" == *.py ]]; then run=("$@"); else run=(train "$@"); fi
cmd=("$PYTHON" -m dtrain launch --nnodes "$nnodes" --nproc-per-node "$nproc"
     --rdzv-endpoint "$head:$port" --rdzv-id "$run_id"
     --rdzv-conf "is_host=$is_host" --rdzv-timeout "${RDZV_TIMEOUT:-300}" --max-restarts "${MAX_RESTARTS:-0}"
     "${run[@]}")
{ printf +; printf ' %q' "${cmd[@]}"; echo; } >&2
exec "${cmd[@]}"
