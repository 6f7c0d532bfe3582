"""The built-in sample: 3,000 training and 1,000 test images cut from CIFAR-10 (JPEG copy),
in the class-folder layout, so ``imgclf demo`` runs end to end with no download."""

from pathlib import Path


def sample_dir() -> Path:
    return Path(__file__).parent / "cifar10"
