"""The script route of the user-path matrix: the same objects handed to dtrain.main, the data chosen by
MATRIX_DATA (digits: dtrain's built-in shards decoded by the script; jpg: TarWriter images with a transform;
tokens: TarWriter token arrays as dict batches for a Hugging Face BERT). Launched as users launch scripts."""

import io
import os

import numpy as np
import torch

import dtrain
import matrix_user
import mynet


def digits_sample(raw):
    return {"x": np.load(io.BytesIO(raw["x.npy"])), "y": int(raw["y.cls"])}


def digits_collate(samples):
    return {
        "x": torch.stack([torch.as_tensor(s["x"]).float() / 16 for s in samples]),
        "y": torch.tensor([s["y"] for s in samples]),
    }


if __name__ == "__main__":
    data = os.environ["MATRIX_DATA"]
    common = {"log.progress": False, "train.log_every": 1}
    if data == "digits":
        dtrain.main(
            config={**common, "run.name": "m", "data.dataset": "digits"},
            model=mynet.build,
            sample=digits_sample,
            collate=digits_collate,
        )
    elif data == "jpg":
        dtrain.main(
            config={
                **common,
                "run.name": "m",
                "data.train": "jpg/train.json",
                "data.val": "jpg/val.json",
                "data.test": "jpg/test.json",
                "data.sample": {"x": "jpg", "y": "cls"},
                "data.image": "l",
                "data.num_classes": 10,
            },
            model=mynet.build,
            transform=matrix_user.jitter,
        )
    elif data == "tokens":
        dtrain.main(
            config={
                **common,
                "run.name": "m",
                "data.train": "tokens/train.json",
                "data.val": "tokens/val.json",
                "data.test": "tokens/test.json",
                "data.num_classes": 4,
                "metrics.builtin": False,
            },
            model=matrix_user.bert,
            sample=matrix_user.to_fields,
            loss=matrix_user.hf_loss,
            metrics=matrix_user.hf_metrics,
        )
    else:
        raise SystemExit(f"MATRIX_DATA={data!r}: digits, jpg or tokens")
