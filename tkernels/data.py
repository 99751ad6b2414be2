"""scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), ready for training.

The images ship inside scikit-learn, so nothing is downloaded. They are split into
stratified train and test sets, scaled from 0..16 to 0..1 and standardised with the
mean and standard deviation of the *training* pixels (the test set never leaks in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

__all__ = ["Digits", "load_digits", "minibatches"]


@dataclass
class Digits:
    x_train: torch.Tensor  # (N, 1, 8, 8)
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float
    std: float
    num_classes: int = 10

    def to(self, device=None, dtype=None) -> "Digits":
        return Digits(self.x_train.to(device=device, dtype=dtype), self.y_train.to(device=device),
                      self.x_test.to(device=device, dtype=dtype), self.y_test.to(device=device),
                      self.mean, self.std, self.num_classes)


def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set comes with scikit-learn: pip install scikit-learn "
                          "(or pip install 'tkernels[demo]')") from exc
    bunch = sk_load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): each class contributes round(test_fraction * its count) to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(test_fraction: float = 0.2, seed: int = 0, *, device=None,
                dtype: torch.dtype = torch.float32, limit: Optional[int] = None) -> Digits:
    """The digits as (N, 1, 8, 8) float images and int64 labels, split train/test.

    ``limit`` keeps only the first ``limit`` training and test images each (for smoke tests).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), but got {test_fraction}")
    images, labels = _sklearn_digits()
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    if limit is not None:
        train_idx, test_idx = train_idx[:limit], test_idx[:limit]
    images = images / 16.0
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    images = (images - mean) / std

    def tensors(idx):
        x = torch.from_numpy(images[idx][:, None]).to(device=device, dtype=dtype)
        return x, torch.from_numpy(labels[idx]).to(device=device)

    (x_train, y_train), (x_test, y_test) = tensors(train_idx), tensors(test_idx)
    return Digits(x_train, y_train, x_test, y_test, mean, std)


def minibatches(n: int, batch_size: int, generator: Optional[torch.Generator] = None,
                shuffle: bool = True, drop_last: bool = False) -> Iterator[torch.Tensor]:
    """Index tensors of successive minibatches over ``n`` samples, in an order drawn from ``generator``
    (two runs with equally seeded generators see the same batches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, but got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
