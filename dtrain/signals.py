"""Clean stops: a signal on any rank becomes the same "stop after step N" on every rank.

SIGTERM, SIGINT and SIGUSR1 only set a flag. Every rank all-reduces its flags on a separate gloo
group (CPU tensors: no GPU sync, and it never interleaves with the gradient all-reduces of the main
group). The reduce is started asynchronously at one check and read at the next, so its latency hides
behind training; every rank reads the same value at the same step and stops together. A check is
every step while steps take CHECK_EVERY_S or longer; for shorter steps every few steps, about
CHECK_EVERY_S apart (an extra collective per millisecond-long CPU step cost 25-30% of the throughput
of 2 CPU ranks; every 0.25 s instead would gain another ~3% there, but the answer comes a check later,
up to 100 millisecond-steps after the signal: a short run then ends before it stops). The reduce also
carries each rank's recent step time, so all ranks compute the same next check from the same agreed
(maximum) value. A second SIGINT aborts at once, and so does
SIGTERM on a rank that has been inside one step for longer than the collective timeout: it is stuck
(its peers have given up on it), and the launcher sends SIGTERM to end it, not to wait for a step
that will not finish.
"""

from __future__ import annotations

import enum
import os
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as torchdist

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: interrupted, resumable — run the same command again
HANDLED = {signal.SIGTERM: 0, signal.SIGINT: 1, signal.SIGUSR1: 2}
CHECK_EVERY_S = 0.05  # how far apart (in training time) the ranks compare their flags, at most
MAX_STEPS_BETWEEN_CHECKS = 100


def first_signal(flags) -> str | None:
    """The name of the signal that stops a run, of the flags (indexed as HANDLED) that some rank or group set;
    None if none. Preemption wins: it is the one that requeues the job."""
    order = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    return next((s.name for s in order if flags[HANDLED[s]] > 0), None)


class StopReason(str, enum.Enum):
    """Why training stopped: the first reason given wins. Its value is what `dtrain train` reports."""

    COMPLETED = "completed"  # every step of the plan
    EARLY_STOP = "early_stop"  # validation loss stopped improving
    STOP_AT_STEP = "stop_at_step"  # run.stop_at_step reached (resumable)
    NONFINITE = "nonfinite"  # train.nonfinite=stop (the last good checkpoint is kept)
    SIGTERM = "signal:SIGTERM"
    SIGINT = "signal:SIGINT"
    SIGUSR1 = "signal:SIGUSR1"  # SLURM preemption: the job requeues itself

    @property
    def finished(self) -> bool:
        """Training is over (test the best weights); otherwise it was interrupted and resumes."""
        return self in (StopReason.COMPLETED, StopReason.EARLY_STOP)

    @property
    def is_signal(self) -> bool:
        return self.value.startswith("signal:")


class StopControl:
    """Why to stop, and when: the stop reasons of the loop's owners (`request`), and the signals of any rank
    turned into the same decision on every rank (`check`)."""

    def __init__(self, group, stuck_after_s: float | None = None, stop_at_step: int | None = None):
        self.flags = torch.zeros(len(HANDLED))
        self.stuck_after_s = stuck_after_s  # dist.timeout_s: a step this long means the rank is stuck
        self.step_started: float | None = None  # time.monotonic() while the trainer is inside a step
        self.group = group  # a gloo group of its own (dist.new_cpu_group), None in single mode
        self._pending = None  # (work, tensor) started at the last check
        self._steps = self._checked_step = self._next_check = 0  # steps so far, at the last check, of the next
        self._checked_at = time.monotonic()
        self.stop_signal: str | None = None  # the agreed signal, once all ranks know
        self.stop_at_step = stop_at_step
        self.reason: StopReason | None = None
        self._signalled = False  # a signal came to this process (its flag is set)
        self._previous = {s: signal.signal(s, self._handle) for s in HANDLED}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.flags[HANDLED[signal.SIGINT]] > 0:
            print("\ndtrain: second interrupt: aborting without a checkpoint", file=sys.stderr, flush=True)
            os._exit(130)
        busy = time.monotonic() - self.step_started if self.step_started is not None else 0.0
        if signum == signal.SIGTERM and self.stuck_after_s is not None and busy > self.stuck_after_s:
            os.write(
                2,
                f"dtrain: SIGTERM received after {busy:.0f} s inside one step (longer than "
                f"dist.timeout_s={self.stuck_after_s:g}): this rank is stuck; exiting now without a "
                "checkpoint (the last one is intact)\n".encode(),
            )
            os._exit(128 + signal.SIGTERM)
        first = not self.flags.any()
        # Set the flag before saying anything: a second signal can re-enter this handler at any
        # bytecode, and must find the first one recorded.
        self.flags[HANDLED[signal.Signals(signum)]] = 1
        self._signalled = True
        if first:  # os.write, not print: a handler may interrupt a print in progress
            os.write(
                2,
                f"dtrain: {signal.Signals(signum).name} received: stopping after this step with a "
                f"checkpoint{' (interrupt again to abort)' if signum == signal.SIGINT else ''}\n".encode(),
            )

    def resumed(self, step: int, total_steps: int, patience_used_up: bool) -> None:
        """A run resumed at `step` with nothing left to train under this config: its training length reached
        (completed), or its early_stop.patience used up (perhaps lowered since)."""
        if step >= total_steps:
            self.request(StopReason.COMPLETED)
        elif patience_used_up:
            self.request(StopReason.EARLY_STOP)

    def state_dict(self) -> dict:
        return {}  # a stop is decided anew in every start; a stateful part, so that state can be added here

    def load_state_dict(self, state: dict) -> None:
        pass

    def request(self, reason: StopReason) -> None:
        """Stop after this step for `reason` (unless an earlier reason already stands)."""
        self.reason = self.reason or reason

    def check(self, step: int, last: bool) -> StopReason | None:
        """After each step, on every rank: the plan's end, run.stop_at_step, or an agreed signal."""
        if last:
            self.request(StopReason.COMPLETED)
        elif self.stop_at_step is not None and step >= self.stop_at_step:
            self.request(StopReason.STOP_AT_STEP)
        signal_name = self.should_stop()
        if signal_name and not last:
            self.request(StopReason(f"signal:{signal_name}"))
        return self.reason

    def should_stop(self) -> str | None:
        """Called once per step on every rank. -> name of the signal that stops all ranks, or None."""
        if self.group is None:  # one process: the flags as they are (read only once a signal came)
            agreed = self.flags.clone() if self.stop_signal is None and self._signalled else None
        else:
            self._steps += 1
            if self._steps < self._next_check:
                return self.stop_signal
            now = time.monotonic()
            step_s = (now - self._checked_at) / (self._steps - self._checked_step)
            self._checked_at, self._checked_step = now, self._steps
            agreed, slowest = None, CHECK_EVERY_S
            if self._pending is not None:  # [flags..., slowest rank's step time] of the last check
                work, result = self._pending
                work.wait()
                agreed, slowest = result[:-1], float(result[-1])
            mine = torch.cat([self.flags, torch.tensor([step_s], dtype=self.flags.dtype)])
            self._pending = (torchdist.all_reduce(mine, torchdist.ReduceOp.MAX, group=self.group, async_op=True), mine)
            # the same agreed step time on every rank: the same next check
            every = int(CHECK_EVERY_S / max(slowest, 1e-6))
            self._next_check = self._steps + min(MAX_STEPS_BETWEEN_CHECKS, max(1, every))
        if agreed is not None and self.stop_signal is None:
            self.stop_signal = first_signal(agreed.tolist())
        return self.stop_signal

    def close(self, wait: bool = True) -> None:
        """Finish the outstanding reduce (every rank started the same number) and restore handlers."""
        if self._pending is not None and wait:
            self._pending[0].wait()
        self._pending = None
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def requeue_slurm_job(log) -> None:
    """Preempted under SLURM (SIGUSR1 from `#SBATCH --signal=USR1@T`): put the job back in the queue.
    Called by rank 0 alone, after the checkpoint is complete, so the requeued job resumes from it."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    # said before the call: SLURM ends the job's steps as soon as the job is requeued, often before
    # scontrol returns, so a line printed after it was lost (seen in CI: job requeued, no line)
    log(f"slurm: requeueing job {job}; it resumes from the checkpoint just written")
    try:  # bounded: the other ranks wait for this in the session's closing barrier
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        why = (proc.stderr.strip() or proc.returncode) if proc.returncode != 0 else None
    except (OSError, subprocess.TimeoutExpired) as e:  # no scontrol here (a container without SLURM's tools)
        why = e
    if why is not None:
        log(f"slurm: `scontrol requeue {job}` failed ({why}); resubmit by hand")
