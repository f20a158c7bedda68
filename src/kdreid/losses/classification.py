"""Identity classification loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_label_smoothing(logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Cross-entropy against smoothed one-hot targets (1 − ε)·y + ε/C (Szegedy et al. 2016; ε = 0.1 in re-ID
    practice, as torchreid's CrossEntropyLoss). logits (N, C), labels (N,) -> scalar mean over the batch."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=epsilon)
