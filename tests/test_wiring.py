"""Components get their collaborators when they are built (issue #34.6), not through attributes set afterwards."""

from __future__ import annotations

import ast
import contextlib
import io
from pathlib import Path

import dtrain
from dtrain.checkpoint import Checkpointer
from dtrain.config import Config
from dtrain.dist import setup
from dtrain.logging import build_logger
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
        return Checkpointer(
            tmp_path,
            2,
            info,
            "h",
            every=2,
            parts=Parts(shared={"counter": counter}, own={}),
            halted=lambda: halted[0],
            clock=clock,
        )

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


def test_the_logger_gets_the_runs_length_when_it_starts(tmp_path, monkeypatch):
    """It is built before the data says how many steps the run has (build_components), and started once a
    resume has settled them (a resume on other ranks keeps the checkpoint's epochs): the bar's length comes
    with start(), not through an attribute set in between."""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    logger = build_logger(Config().log, setup(force_single=True), tmp_path)
    logger.start(3, 12)
    assert (logger.bar.n, logger.bar.total) == (3, 12)
    logger.close()


def test_build_sets_no_attribute_of_another_object():
    """build.py hands each component its collaborators through its constructor: an `x.attr = ...` there
    (the logger's total_steps was one) is wiring after construction."""
    tree = ast.parse((Path(dtrain.__file__).parent / "build.py").read_text())
    targets = [
        t
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
    ]
    names = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
    assert [
        ast.unparse(n)
        for n in names
        if isinstance(n, ast.Attribute) and not (isinstance(n.value, ast.Name) and n.value.id == "self")
    ] == []
