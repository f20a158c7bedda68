"""kdreid: unsupervised multi-target domain adaptation for person re-ID by knowledge distillation."""

__version__ = "0.1.0"
