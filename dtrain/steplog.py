"""What the training loop reports as it goes: the log line every train.log_every steps, and updates skipped
for a non-finite gradient norm.

`StepLog` owns the cadence and the line: the mean of each loss term over the steps since the last line (kept
on the device, all-reduced once a line, and checkpointed: a resume goes on with the same window), the LR and the throughput (training time only: the meter restarts
after a line, so validation and saving that follow it are not counted). `SkippedUpdates` counts the skipped
updates without a host sync per step (an optimizer that decides on the device returns a tensor, added up
there and read at the next line or save), warns with the steps they happened in, under train.nonfinite=stop
stops the run at the first one, through the stop control, and keeps how many were skipped in a row (a run
that ends in two or more never reports "completed": trainer.check_weights).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import dist
from .signals import StopReason


class SkippedUpdates:
    def __init__(
        self, policy: str, device: torch.device, stop, warn: Callable[[str], None], step_of: Callable[[], int]
    ):
        self.policy, self.stop, self.warn, self.step_of = policy, stop, warn, step_of
        self.total = 0
        self._pending = torch.zeros((), device=device)  # skipped updates not yet counted on the host
        self._counted = 0  # the step up to which they were
        self._in_a_row = torch.zeros((), device=device)  # updates skipped in a row up to the last step

    def add(self, skipped, step: int) -> None:
        """After optimizer step `step`: `skipped` is False, True (decided on the host) or a device tensor."""
        if skipped is False:
            self._in_a_row.zero_()
        else:
            self._pending += skipped
            self._in_a_row = (self._in_a_row + 1) * skipped  # on the device: no sync
        if skipped is True or self.policy == "stop":  # decided on the host, or must stop now
            self.count(step, first=step)

    def count(self, step: int, first: Optional[int] = None) -> None:
        """Report updates skipped in steps `first`..`step` (default: since the last count). A host sync."""
        n, first = int(self._pending.item()), first or self._counted + 1
        self._counted = step
        if n == 0:
            return
        self._pending.zero_()
        self.total += n
        where = f"step {step}" if first == step else f"steps {first}-{step}"
        self.warn(
            f"{where}: non-finite gradient norm; {n} update{'s' * (n > 1)} skipped "
            f"({self.total} so far, train.nonfinite={self.policy})"
        )
        if self.policy == "stop":
            self.stop.request(StopReason.NONFINITE)

    def in_a_row(self) -> int:
        """Updates skipped in a row up to the last step (a host sync). A skipped update leaves the weights as
        they were, so two or more mean the same weights gave non-finite gradients on as many batches."""
        return int(self._in_a_row.item())

    def state_dict(self) -> dict:
        self.count(self.step_of())
        return {"skipped_updates": self.total, "in_a_row": self.in_a_row()}

    def load_state_dict(self, state: dict) -> None:
        self.total, self._counted = state["skipped_updates"], self.step_of()
        self._in_a_row.fill_(state.get("in_a_row", 0))  # 0: a checkpoint from before it was kept


class StepLog:
    def __init__(
        self,
        log,
        meter,
        loss_names: list[str],
        every: int,
        show_tokens: bool,
        lr_of: Callable[[], float],
        skipped: SkippedUpdates,
        device: torch.device,
    ):
        self.log, self.meter, self.names, self.every, self.show_tokens = log, meter, loss_names, every, show_tokens
        self.lr_of, self.skipped = lr_of, skipped
        self._sum = torch.zeros(len(loss_names), device=device)  # each loss term, summed since the last line
        self._steps = 0

    def after_step(self, step: int, epoch: int, loss: torch.Tensor, last: bool) -> None:
        self._sum += loss
        self._steps += 1
        self.meter.step()
        if step % self.every == 0 or last:
            with dist.guard("loss all-reduce (logging)"):
                self.write(step, epoch)
        self.log.advance(step)

    def write(self, step: int, epoch: int) -> None:
        # .tolist() is the sync point (every log_every steps): the clock read after it includes all device work
        losses = dist.all_reduce_mean(self._sum / self._steps).tolist()
        self.skipped.count(step)
        speed = self.meter.record()  # rank 0's clock and data wait; samples/s counts the global batch
        record = {"step": step, "epoch": epoch, **dict(zip(self.names, losses)), "lr": self.lr_of(), **speed}
        self.log.metrics(record)
        shown = {k: speed[k] for k in ("samples_per_s", "tokens_per_s", "data_wait_frac", "mfu") if k in speed}
        if not self.show_tokens:
            shown.pop("tokens_per_s")
        self.log.progress(step, loss=losses[0], lr=record["lr"], **shown)
        self._sum.zero_()
        self._steps = 0
        self.meter.reset()

    def training_resumes(self) -> None:
        """After a step's validation and saving: throughput counts training time only."""
        if self._steps == 0:
            self.meter.reset()

    # The open window is this rank's state (its own loss sums), so a resumed run's first line averages the
    # same steps as an uninterrupted run's and logs the same value: the window restarted at the resume, and
    # the first loss logged after a SIGTERM resume was 5.48 where the uninterrupted run logged 5.23 (#32.8).
    # The throughput figures are wall time and restart with each start.
    def state_dict(self) -> dict:
        return {"loss_sum": self._sum.to("cpu", copy=True), "steps": self._steps}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Collective. None on a rank the checkpoint's run did not have, or from a checkpoint written before the
        window was saved: then every rank starts a new window, so that all divide by the same number of steps."""
        missing = dist.all_reduce_max(torch.tensor(float(state is None), device=self._sum.device))
        if missing.item():
            self._sum.zero_()
            self._steps = 0
        else:
            self._sum.copy_(state["loss_sum"])
            self._steps = state["steps"]
