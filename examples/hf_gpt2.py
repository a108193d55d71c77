"""A Hugging Face GPT-2 (a small config, random initialisation) trained by dtrain from a script of your own:
byte-level text (dtrain's `text` data set), the loss taken from the model's own output, a torchmetrics
accuracy. Launched exactly as `dtrain train` is, with the same --config, key=value overrides, run directory,
checkpoints, exact resume, signals and W&B:

    python examples/hf_gpt2.py                                      # one process
    torchrun --nproc-per-node 2 examples/hf_gpt2.py train.epochs=2  # two ranks
    srun --ntasks 2 python examples/hf_gpt2.py                      # under SLURM
    python examples/hf_gpt2.py eval --checkpoint runs/hf-gpt2       # the script rebuilds its own model
"""

import torchmetrics
from transformers import GPT2Config, GPT2LMHeadModel

import dtrain


def build_model(input_shape, num_outputs, n_layer=2, n_head=4, n_embd=64):
    """dtrain passes the data set's input shape (context,) and outputs (256 byte tokens), and model.kwargs."""
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=num_outputs,
            n_positions=input_shape[-1],
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def forward(model, batch):
    tokens, _, _ = batch  # dtrain's text batches: (tokens, the same shifted by one, sample keys)
    return model(input_ids=tokens, labels=tokens)  # GPT-2 shifts the labels itself


def loss(output, batch):
    return output.loss  # the model's own cross-entropy


if __name__ == "__main__":
    dtrain.main(
        config={
            "run.name": "hf-gpt2",
            "model.head": "lm_head",
            "data.dataset": "text",
            "data.text_context": 64,
            "data.text_bytes": 200_000,
            "data.batch_size": 16,
            "train.epochs": 1,
            "optim.lr": 1e-3,
            "schedule.warmup_steps": 20,
        },
        model=build_model,
        forward=forward,
        loss=loss,
        # updated with (logits, next tokens); synchronised across ranks by torchmetrics
        metrics={"token_acc": torchmetrics.classification.MulticlassAccuracy(num_classes=256, average="micro")},
    )
