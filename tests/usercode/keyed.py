"""A model factory that takes credentials, as one that downloads weights from a hub would (tests/test_secrets)."""

from mynet import SmallConvNet


def build(api_key: str, token: str, endpoint: str = "", num_classes: int = 10, width: int = 8) -> SmallConvNet:
    """The run's own build gets the real values, never a redacted one (a resume passes them again)."""
    if api_key.startswith("<redacted") or token.startswith("<redacted"):
        raise ValueError("keyed.build was handed a redacted credential")
    return SmallConvNet(1, num_classes, width)
