"""The per-sample transform of configs/photos.yaml (`data.transform: photo_transforms:augment`): plain torch,
drawing from torch's global generator as torchvision.transforms.v2 does. dtrain seeds that generator per
sample from (run.seed, epoch, pass, sample key), so a resumed run augments exactly as an uninterrupted one.
Where torchvision is installed, a v2 pipeline goes here the same way, e.g.
`augment = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomResizedCrop(32, scale=(0.6, 1.0))])`."""

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor) -> torch.Tensor:
    """x: float CHW in [0, 1]. A random horizontal flip, a random crop of 24-32 pixels resized back to
    32 x 32, and a brightness change of up to 10%."""
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    size = x.shape[-1]
    side = int(torch.randint(size * 3 // 4, size + 1, ()))
    top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,)))
    x = F.interpolate(
        x[None, :, top : top + side, left : left + side], size=(size, size), mode="bilinear", align_corners=False
    )[0]
    return (x * (1 + 0.2 * (torch.rand(()) - 0.5))).clamp(0, 1)
