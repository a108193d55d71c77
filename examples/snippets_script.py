"""The text classification of configs/snippets.yaml from a script of your own: which standard-library package
a snippet of Python source comes from, on shards written by webdataset's TarWriter, with the sample decoding,
the collate, the model, its forward and a torchmetrics F1 handed to dtrain.main as objects. Launched exactly as
`dtrain train` is, with the same --config, key=value overrides, run directory, checkpoints, resume and signals:

    python examples/snippets_script.py                                   # one process
    torchrun --nproc-per-node 2 examples/snippets_script.py              # two ranks
    python examples/snippets_script.py eval --checkpoint runs/snippets-script
"""

import torchmetrics
from transformers import BertConfig, BertForSequenceClassification

import dtrain
from snippets import MAX_TOKENS, PACKAGES, PAD, VOCAB, collate, forward, write_shards  # examples/snippets.py


def sample(raw):
    """A raw webdataset sample (member extension -> bytes) -> its fields: the snippet's text, its class."""
    return {"x": raw["txt"].decode("utf-8"), "y": int(raw["cls"])}


def build_model(num_outputs, width=32, layers=2):
    """dtrain passes the classes (data.num_classes) as num_outputs, and model.kwargs."""
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * width,
            max_position_embeddings=MAX_TOKENS,
            num_labels=num_outputs,
            pad_token_id=PAD,
        )
    )


if __name__ == "__main__":
    root = write_shards("data/snippets")  # on first use (every rank may call it: one copy is kept)
    dtrain.main(
        config={
            "run.name": "snippets-script",
            "data.train": f"{root}/train.json",
            "data.val": f"{root}/val.json",
            "data.test": f"{root}/test.json",
            "data.num_classes": len(PACKAGES),
            "data.batch_size": 32,
            "model.head": "classifier",
            "optim.lr": 0.006,
            "optim.weight_decay": 0.01,
            "schedule.name": "cosine",
            "schedule.warmup_steps": 20,
            "train.epochs": 12,
        },
        sample=sample,
        collate=collate,
        model=build_model,
        forward=forward,
        # updated with (logits, y); synchronised across ranks by torchmetrics
        metrics={"f1": torchmetrics.classification.MulticlassF1Score(num_classes=len(PACKAGES), average="macro")},
    )
