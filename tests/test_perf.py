"""Issue 9: the GPT model and its FLOPs, the text data set and lm task, throughput metrics, `dtrain bench`."""

import json
import re

import pytest
import torch

from conftest import metrics_of, result_of, run_dtrain
from dtrain.config import load_config
from dtrain.data import ShardStream, make_builtin
from dtrain.engine.single import should_compile
from dtrain.batch import default_forward
from dtrain.build import DataFacts, probe
from dtrain.losses import build_loss
from dtrain.metrics import build_metrics
from dtrain.models import build_model
from dtrain.models.gpt import GPT
from dtrain.throughput import Throughput, peak_flops

TINY_GPT = ["model.factory=gpt", "model.kwargs.n_layer=2", "model.kwargs.n_head=2", "model.kwargs.n_embd=32"]


def facts(shape, out):
    return {"input_shape": shape, "num_outputs": out}


def probed_flops(model, batch, task, shape):
    cfg = load_config()
    return probe(
        model,
        batch,
        default_forward,
        build_loss(cfg.loss, task),
        build_metrics(cfg.metrics, task, 0.0),
        torch.device("cpu"),
        DataFacts(task, shape, None),
        print,
    )


THROUGHPUT_KEYS = {"samples_per_s", "tokens_per_s", "step_time_s", "data_wait_frac", "peak_mem_mb"}


def test_gpt_forward_backward_shapes_and_tied_head():
    m = build_model(load_config(None, TINY_GPT).model, facts((16,), 256), seed=0)
    assert isinstance(m, GPT) and m.block_size == 16 and m.head.weight is m.body.wte.weight
    x = torch.randint(0, 256, (3, 16))
    logits = m(x)
    assert logits.shape == (3, 16, 256)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters())
    assert m(x[:, :5]).shape == (3, 5, 256)  # shorter sequences are fine, longer ones are not
    with pytest.raises(ValueError, match="block_size"):
        m(torch.randint(0, 256, (1, 17)))


def test_gpt_flops_formula_and_gpt2_shape():
    m = GPT(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    n = sum(p.numel() for p in m.parameters()) - 16 * 32  # without position embeddings (no matmul)
    assert m.num_params() == n
    assert m.flops_per_token() == 6 * n + 12 * 2 * 2 * 16 * 16  # 6N + 12 L H Q T
    assert m.flops_per_token(8) == 6 * n + 12 * 2 * 2 * 16 * 8
    x = torch.randint(0, 256, (2, 16))
    assert probed_flops(m, (x, x, ["a", "b"]), "lm", (16,)) == 16 * m.flops_per_token(16)
    with torch.device("meta"):  # GPT-2 124M's shape without allocating it
        gpt2 = build_model(load_config(None, ["model.factory=gpt"]).model, facts((1024,), 50257), seed=0)
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size) == (12, 12, 768, 1024)
    assert gpt2.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, tied head counted once


def test_mlp_flops_are_three_times_the_forward_matmuls():
    m = build_model(load_config(None, []).model, facts((1, 8, 8), 10), seed=0)  # 64 -> 128 -> 64 -> 10
    batch = (torch.rand(2, 1, 8, 8), torch.tensor([1, 2]), ["a", "b"])
    assert probed_flops(m, batch, "classification", (1, 8, 8)) == 3 * 2 * (64 * 128 + 128 * 64 + 64 * 10)


def test_gpt_config_as_nested_yaml_section(tmp_path):
    path = tmp_path / "gpt.yaml"
    path.write_text("model:\n  factory: gpt\n  kwargs: {n_layer: 3, n_embd: 48, n_head: 4}\n")
    cfg = load_config(path, ["model.kwargs.bias=false"])
    m = build_model(cfg.model, facts((16,), 256), seed=0)
    assert (m.n_layer, m.n_embd, m.body.ln_f.bias) == (3, 48, None)
    from dtrain.config import ConfigError

    with pytest.raises(ConfigError, match="dtrain.models:gpt rejects these arguments .*n_layers"):
        build_model(load_config(None, ["model.factory=gpt", "model.kwargs.n_layers=2"]).model, facts((16,), 256), 0)


def test_switches_default_on_only_where_they_help():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not should_compile("auto", cpu) and should_compile("auto", cuda) and should_compile(True, cpu)
    assert peak_flops(cpu) is None and peak_flops(cpu, 1e12) == 1e12
    meter = Throughput(8, 4, flops_per_sample=1e6, peak_flops_per_device=1e9, world_size=2, device=cpu)
    meter.data_wait = 0.0
    meter.step()
    rec = meter.record()
    assert THROUGHPUT_KEYS | {"mfu"} <= rec.keys() and rec["tokens_per_s"] == pytest.approx(4 * rec["samples_per_s"])
    assert rec["mfu"] == pytest.approx(1e6 * rec["samples_per_s"] / 2e9) and rec["peak_mem_mb"] > 0


def test_text_windows_shift_by_one_token(tmp_path):
    index = make_builtin("text", tmp_path / "text", 200, context=32, num_bytes=20_000)
    assert index.task == "lm" and index.num_classes == 256 and tuple(index.input_shape) == (32,)
    assert not any(p.name.endswith(".y.cls") for p in tmp_path.rglob("*"))  # targets come from the input
    x, y, _ = next(iter(ShardStream(index, "val", batch_size=4, rank=0, world_size=1).epoch(0)))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert bytes(x[0].tolist()).isascii()  # Python source


def test_lm_run_logs_throughput_and_perplexity(tmp_path):
    proc = run_dtrain(
        [
            "shard",
            "--dataset",
            "text",
            "--out",
            "text",
            "--context",
            "32",
            "--text-bytes",
            "30000",
            "--shard-size",
            "200",
        ],
        tmp_path,
    )
    assert "wrote text/train.json, text/val.json, text/test.json" in proc.stdout
    run = run_dtrain(
        [
            "train",
            "data.dataset=folder:text",
            *TINY_GPT,
            "data.batch_size=8",
            "train.max_steps=6",
            "train.log_every=2",
            "run.name=lm",
        ],
        tmp_path,
    )
    result = result_of(run)
    assert result["stop_reason"] == "completed" and result["test/ppl"] == pytest.approx(
        2.718281828 ** result["test/loss"]
    )
    records = metrics_of(tmp_path / "runs" / "lm")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert THROUGHPUT_KEYS <= r.keys() and "mfu" not in r  # no peak FLOPs known on CPU
        assert r["tokens_per_s"] == pytest.approx(32 * r["samples_per_s"]) and 0 <= r["data_wait_frac"] <= 1
    assert any("val/acc" in r and "val/ppl" in r for r in records)


def test_throughput_keys_in_a_classification_run_with_peak_flops(tmp_path, data_root):
    run_dtrain(
        ["train", f"data.root={data_root}", "train.max_steps=4", "train.log_every=2", "train.peak_flops=1e12"], tmp_path
    )
    train = [r for r in metrics_of(tmp_path / "runs" / "digits") if "loss" in r]
    # images are no tokens: no tokens_per_s (it was samples_per_s again)
    assert all((THROUGHPUT_KEYS - {"tokens_per_s"}) | {"mfu"} <= r.keys() and "tokens_per_s" not in r for r in train)


ROW = re.compile(r"^\| (\(\w\)[^|]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([^|]+) \| ([\d.]+) \|$")


def test_bench_prints_a_well_formed_table(tmp_path):
    proc = run_dtrain(
        [
            "bench",
            "--model",
            "gpt",
            "--steps",
            "3",
            "--reps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "16",
            "--ckpt-every",
            "2",
            "--out",
            "bench",
            "--json",
            "bench.json",
        ],
        tmp_path,
    )
    rows = [ROW.match(l) for l in proc.stdout.splitlines() if l.startswith("| (")]
    assert len(rows) == 5 and all(rows), proc.stdout
    labels = [m.group(1) for m in rows]
    assert labels[0].startswith("(a) hand-written") and labels[2].startswith("(c) dtrain, webdataset")
    assert float(rows[0].group(6)) == 1.0 and all(float(m.group(6)) > 0 for m in rows)
    assert re.search(r"stall per save sync -?[\d.]+ ms, async -?[\d.]+ ms", proc.stdout)
    assert re.search(r"^\(c\) shards / \(b\) synthetic: [\d.]+$", proc.stdout, re.M), proc.stdout
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["key"] for r in saved["rows"]] == ["a", "b", "c", "d_sync", "d_async"]
    assert saved["checkpoint_stall"]["d_sync"]["saves_per_segment"] >= 1 and saved["shards_vs_synthetic"] > 0


def test_bench_runs_a_cnn(tmp_path):
    proc = run_dtrain(
        [
            "bench",
            "--model",
            "cnn",
            "--steps",
            "2",
            "--reps",
            "1",
            "--warmup",
            "1",
            "--batch-size",
            "4",
            "--ckpt-every",
            "2",
            "--out",
            "bench",
        ],
        tmp_path,
    )
    assert sum(bool(ROW.match(l)) for l in proc.stdout.splitlines()) == 5, proc.stdout
