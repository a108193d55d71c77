"""What a user hands in from Python is used exactly once, as the object handed in, whether the script defined it
(`__main__:...`, which no import rebuilds) or imported it (issue 32, 1): every hook counts its calls
(tests/usercode/handed_in_user.py) and what it logs is checked against dtrain's own computation."""

import shutil

import pytest
import yaml

from conftest import REPO, _run_here, metrics_of

USERCODE = REPO / "tests" / "usercode"
SCRIPT = USERCODE / "handed_in_script.py"


def run_script(cwd, data_root, *args, **env):
    """`python handed_in_script.py data.root=... ARGS` in this process -> (its run directory, the hooks' call
    counts, its stdout)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(USERCODE))
        import handed_in_user as user

        user.COUNTS.clear()
        if not args:  # training: a fresh run
            shutil.rmtree(cwd / "runs", ignore_errors=True)
        proc = _run_here([*args, f"data.root={data_root}"], cwd, env, script=SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "runs" / "handed-in", dict(user.COUNTS), proc.stdout


@pytest.fixture(scope="module")
def builtin_loss_run(tmp_path_factory, data_root):
    """The same run with dtrain's own cross-entropy in place of the handed-in one: the reference."""
    run_dir, _, _ = run_script(
        tmp_path_factory.mktemp("reference"), data_root, HANDED_IN="module", METRICS="fn", NO_LOSS="1"
    )
    return metrics_of(run_dir)


@pytest.mark.parametrize("metrics", ["fn", "dict", "list"])
@pytest.mark.parametrize("handed_in", ["main", "module"])
def test_every_hook_handed_in_is_used_once_as_it_was_handed_in(
    tmp_path, data_root, builtin_loss_run, handed_in, metrics
):
    run_dir, calls, _ = run_script(tmp_path, data_root, HANDED_IN=handed_in, METRICS=metrics)
    # once per use: the model and its param groups built once; each forward's output through the loss once;
    # each evaluated batch (the probe's, validation's, test's) through the metrics once; each training
    # sample transformed once (6 steps of 16); each decoded sample batched once
    assert calls["model"] == 1 and calls["param_groups"] == 1, calls
    assert calls["forward"] == calls["model.train"] + calls["model.eval"] == calls["loss"], calls
    assert calls["model.train"] == 6 and calls["transform"] == 6 * 16, calls
    assert calls["collated"] == calls["sample"] > 0, calls
    for counted in {"fn": ["metrics"], "dict": ["torchmetrics"], "list": ["metrics", "torchmetrics"]}[metrics]:
        assert calls[counted] == calls["model.eval"], calls

    records = metrics_of(run_dir)
    evaluated = [r for r in records if "val/loss" in r or "test/loss" in r]
    assert len(evaluated) == 3  # steps 3 and 6, and the test
    for r in evaluated:
        split = "val" if "val/loss" in r else "test"
        for name in {"fn": ["my_acc"], "dict": ["tm_acc"], "list": ["my_acc", "tm_acc"]}[metrics]:
            assert r[f"{split}/{name}"] == pytest.approx(r[f"{split}/acc"], abs=1e-6), r  # dtrain's own accuracy

    # the handed-in cross-entropy trains and evaluates as dtrain's own does
    def losses(records):
        return [(r["step"], k, r[k]) for r in records for k in ("loss", "val/loss", "test/loss") if k in r]

    got, reference = losses(records), losses(builtin_loss_run)
    assert [g[:2] for g in got] == [r[:2] for r in reference] and len(got) == 9
    assert [g[2] for g in got] == pytest.approx([r[2] for r in reference], rel=1e-6)

    names = {"main": "__main__", "module": "handed_in_user"}[handed_in]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())  # what trained the run, by name
    assert config["model"]["factory"] == f"{names}:model" and config["loss"]["fn"] == f"{names}:loss"
    assert config["model"]["forward"] == f"{names}:forward" and config["data"]["collate"] == f"{names}:collate"
    assert config["data"]["sample"] == f"{names}:sample" and config["data"]["transform"] == f"{names}:transform"
    assert config["metrics"]["fn"] == (f"{names}:metrics" if metrics == "fn" else None)

    # evaluated again by the script (the command its summary gives): the same hooks, each once
    _, calls, out = run_script(
        tmp_path,
        data_root,
        "eval",
        "--checkpoint",
        str(run_dir / "checkpoints" / "best"),
        "--split",
        "test",
        HANDED_IN=handed_in,
        METRICS=metrics,
    )
    printed = dict(line.split() for line in out.splitlines() if line.startswith("  test/"))
    best = next(r for r in evaluated if "test/loss" in r)  # the test split, scored with the best weights
    for name in {"fn": ["my_acc"], "dict": ["tm_acc"], "list": ["my_acc", "tm_acc"]}[metrics]:
        assert float(printed[f"test/{name}"]) == pytest.approx(best["test/acc"], abs=1e-5), out
    for counted in {"fn": ["metrics"], "dict": ["torchmetrics"], "list": ["metrics", "torchmetrics"]}[metrics]:
        assert calls[counted] == calls["loss"] > 0, calls  # each scored batch (the confusion matrix scores none)


def test_a_hook_handed_in_takes_the_place_of_its_config_key_in_every_form():
    """One rule for every hook: config.yaml names what was handed in (record), and the builders see its key
    empty (replacing), whatever the config file had set there."""
    import dataclasses

    import torch

    from dtrain.build import RECORDED, Hooks
    from dtrain.config import load_config

    assert {f.name for f in dataclasses.fields(Hooks)} == set(RECORDED) | {"param_groups"}  # each hook its key
    cfg = load_config(
        None,
        [
            "model.factory=mynet:build",
            "model.forward=mynet:fwd",
            "loss.fn=mynet:two_terms",
            "metrics.fn=mynet:top2",
            "data.sample={x: png, y: cls}",
            "data.transform=m:t",
            "data.collate=m:c",
            "run.callbacks=[m:Printer]",
        ],
    )

    def metric(output, batch):
        return {}

    class Printer:
        def on_step_end(self, step, loss): ...

    hooks = Hooks(
        model=torch.nn.Linear(2, 2),
        loss=metric,
        metrics=[metric, {"f1": object()}],
        forward=metric,
        sample={"x": "jpg;png", "y": "cls"},
        transform=metric,
        collate=metric,
        optimizer=metric,
        scheduler=metric,
        callbacks=[Printer()],
    )
    recorded, built = hooks.record(cfg), hooks.replacing(cfg)
    name = f"{__name__}:test_a_hook_handed_in_takes_the_place_of_its_config_key_in_every_form.<locals>.metric"
    assert recorded.model.factory == "torch.nn.modules.linear:Linear" and recorded.loss.fn == name
    assert recorded.metrics.fn is None  # a list: nothing to name, and the config's metrics.fn is not used
    assert recorded.data.sample == {"x": "jpg;png", "y": "cls"} and recorded.data.collate == name
    assert recorded.run.callbacks == [name.replace(".metric", ".Printer")]  # a list of callbacks: their names
    for section, key in RECORDED.values():
        assert getattr(getattr(built, section), key) == ([] if key == "callbacks" else None), (section, key)
    assert Hooks(loss=metric).replacing(cfg).metrics.fn == "mynet:top2"  # only what was handed in
