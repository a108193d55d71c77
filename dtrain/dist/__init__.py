"""Where this worker sits in the job, and the few collectives the trainer needs: `from dtrain import dist`.

  environment.py  the launcher's variables (torchrun, SLURM, none) -> Launch, or a one-line LaunchError
  rendezvous.py   setup(): device, backend and a bounded rendezvous -> DistInfo; teardown()
  collectives.py  all_reduce_*, broadcast_*, barrier, new_cpu_group; guard(op): a failed collective as one
                  line naming the lost rank (CollectiveError)

Each imports only the one before it (rendezvous keeps the store the roll call of collectives asks).
"""

from .collectives import (ROLL_CALL_S, CollectiveError, RollCall, all_reduce_max, all_reduce_mean, all_reduce_sum,
                          barrier, broadcast_buffers, broadcast_object, guard, new_cpu_group)
from .environment import (SINGLE, Launch, LaunchError, detect, first_host, hostnames, parse_nodelist,
                          slurm_port)
from .rendezvous import DistInfo, setup, teardown

__all__ = ["ROLL_CALL_S", "CollectiveError", "RollCall", "all_reduce_max", "all_reduce_mean", "all_reduce_sum",
           "barrier", "broadcast_buffers", "broadcast_object", "guard", "new_cpu_group", "SINGLE", "Launch",
           "LaunchError", "detect", "first_host", "hostnames", "parse_nodelist", "slurm_port", "DistInfo", "setup",
           "teardown"]
