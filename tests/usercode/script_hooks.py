"""A script that hands its data hooks to dtrain.main (tests: they must work on every rank, start-up check on)."""

import io

import numpy as np
import torch

import dtrain


def sample(raw):
    """dtrain's digits shards (x.npy + y.cls), decoded by the script itself."""
    return {"x": np.load(io.BytesIO(raw["x.npy"])), "y": int(raw["y.cls"])}


def collate(samples):
    return {
        "x": torch.stack([torch.as_tensor(s["x"]).float() / 16 for s in samples]),
        "y": torch.tensor([s["y"] for s in samples]),
    }


if __name__ == "__main__":
    dtrain.main(
        config={
            "run.name": "script-hooks",
            "data.dataset": "digits",
            "data.batch_size": 16,
            "train.max_steps": 6,
            "train.val_every": 3,
            "log.progress": False,
        },
        sample=sample,
        collate=collate,
    )
