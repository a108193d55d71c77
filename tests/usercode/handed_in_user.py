"""Hooks of every kind that count their calls (tests/test_handed_in.py): imported by handed_in_script.py, which
hands them to dtrain.main as they are or through functions of its own (`__main__:...`). Each call counts once."""

import collections
import io

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

COUNTS: collections.Counter = collections.Counter()


class Net(nn.Module):
    """Counts its forwards in training and in eval mode (the probe, validation and test are eval)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        COUNTS["model.train" if self.training else "model.eval"] += 1
        return self.fc(x.flatten(1))


def model():
    COUNTS["model"] += 1
    return Net()


def loss(output, batch):
    COUNTS["loss"] += 1
    return F.cross_entropy(output, batch["y"])


def metrics(output, batch):
    COUNTS["metrics"] += 1
    return {"my_acc": (output.argmax(-1) == batch["y"]).sum().float()}


class Accuracy(torchmetrics.classification.MulticlassAccuracy):
    def update(self, *args):
        COUNTS["torchmetrics"] += 1
        super().update(*args)


def forward(model, batch):
    COUNTS["forward"] += 1
    return model(batch["x"])


def param_groups(model):
    COUNTS["param_groups"] += 1
    return [{"params": list(model.parameters())}]


def sample(raw):
    COUNTS["sample"] += 1
    return {"x": np.load(io.BytesIO(raw["x.npy"])), "y": int(raw["y.cls"])}


def transform(x):
    COUNTS["transform"] += 1
    return x


def collate(samples):
    COUNTS["collate"] += 1
    COUNTS["collated"] += len(samples)
    return {
        "x": torch.stack([torch.as_tensor(s["x"]).float() / 16 for s in samples]),
        "y": torch.tensor([s["y"] for s in samples]),
    }
