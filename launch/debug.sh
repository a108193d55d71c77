#!/usr/bin/env bash
# Debug: one process, no launcher, data in the main process, anomaly detection, a few steps with
# per-step loss, grad norm, LR and timing (`dtrain train --debug`). Launcher variables are removed, so
# it runs the same inside a torchrun/SLURM environment; Python and C++ stack traces are switched on.
#
#   launch/debug.sh [-- dtrain train args]
#   launch/debug.sh -- --config configs/count.yaml train.debug_steps=10
set -euo pipefail

PYTHON=${PYTHON:-python3}
[ "${1:-}" = "--" ] && shift
[ "${1:-}" = "train" ] && shift

cmd=(env -u RANK -u WORLD_SIZE -u LOCAL_RANK -u LOCAL_WORLD_SIZE -u SLURM_PROCID
     PYTHONFAULTHANDLER=1 TORCH_SHOW_CPP_STACKTRACES=1 CUDA_LAUNCH_BLOCKING=1
     "$PYTHON" -m dtrain train --debug "$@")
{ printf +; printf ' %q' "${cmd[@]}"; echo; } >&2
exec "${cmd[@]}"
