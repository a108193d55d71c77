"""Components get their collaborators when they are built (issue #34.6), not through attributes set afterwards."""

from __future__ import annotations

import contextlib

from dtrain.checkpoint import Checkpointer
from dtrain.dist import setup
from dtrain.state import Parts


class Counter:
    def __init__(self):
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def test_the_checkpointer_is_built_with_its_parts_halt_and_clock(tmp_path):
    info = setup(force_single=True)
    counter, halted, timed = Counter(), [False], []

    @contextlib.contextmanager
    def clock(part):
        timed.append(part)
        yield

    def build():
        return Checkpointer(tmp_path, 2, info, "h", every=2, parts=Parts(shared={"counter": counter}, own={}),
                            halted=lambda: halted[0], clock=clock)

    ckpt = build()
    counter.n = 5
    ckpt.after_step(2)
    ckpt.after_validation(2, improved=False)
    counter.n = 6
    ckpt.after_validation(3, improved=True)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    assert timed == ["checkpoint", "checkpoint"]
    halted[0] = True  # training stopped on a bad step: nothing after it is saved
    ckpt.after_step(4)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]

    counter.n = 0
    resumed = build()
    assert resumed.restore(print) == tmp_path / "step-00000003"
    assert counter.n == 6 and resumed.saved_step == 3
    assert resumed.best_steps == [3]  # its own state went with the parts and came back
    state, _ = resumed.load(tmp_path / "step-00000003")
    assert set(state) == {"format", "counter", "checkpointer"}
