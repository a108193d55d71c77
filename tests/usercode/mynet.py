"""A user's own model package for the tests: on PYTHONPATH, not inside dtrain, written as a practitioner
would (a last layer named `fc` like torchvision's ResNets, a factory that takes num_classes)."""

import os

import torch
import torch.nn.functional as F
from torch import nn


class SmallConvNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def build(num_classes: int = 10, width: int = 16) -> SmallConvNet:
    return SmallConvNet(1, num_classes, width)


class Faulty(SmallConvNet):
    """A bug in the user's code: forward raises on rank FAULTY_RANK at training call FAULTY_CALL."""

    calls = 0

    def forward(self, x):
        if self.training:
            Faulty.calls += 1
            if (
                Faulty.calls == int(os.environ["FAULTY_CALL"])
                and os.environ.get("RANK", "0") == os.environ["FAULTY_RANK"]
            ):
                raise ValueError("a bug in mynet.Faulty.forward")
        return super().forward(x)


def faulty(num_classes: int = 10) -> Faulty:
    return Faulty(1, num_classes)


def not_a_module():
    return "a string"


NOT_CALLABLE = 42


def vector_loss(output, batch):
    return F.cross_entropy(output, batch[1], reduction="none")  # [B]: forgot the reduction


def two_terms(output, batch):
    """A loss of named terms: each is logged, their sum is backpropagated."""
    return {"ce": F.cross_entropy(output, batch[1]), "logit_l2": 1e-3 * output.pow(2).mean()}


def top2(output, batch):
    """Metrics as per-batch sums: a count (divided by the samples) and a ratio (numerator, denominator)."""
    y = batch[1]
    hit2 = (output.topk(2, dim=-1).indices == y[:, None]).any(-1)
    wrong = output.argmax(-1) != y
    return {"top2": hit2.sum().float(), "error_rate": (wrong.sum().float(), torch.tensor(float(len(y))))}
