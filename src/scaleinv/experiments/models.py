"""Small models whose weights a normalization follows, so that they are scale-invariant.

* :class:`ResNet`: residual network with BatchNorm after every convolution (1-D or 2-D); each
  convolution weight is scale-invariant per output channel.
* :class:`NormMLP`: ``Linear -> LayerNorm -> ReLU`` blocks; each hidden ``Linear`` (no bias) is
  scale-invariant as a whole tensor (LayerNorm mixes the output channels).
* :class:`CharTransformer`: post-LN Transformer whose block projections are weight-normalised
  (``W = g V / |V|`` per output row, the paper's Transformer-XL + WN); every direction ``V`` is
  scale-invariant per output channel.
* :class:`EmbeddingNet`: a 1-D ResNet trunk with an L2-normalised embedding, trained against
  L2-normalised class proxies; the embedding layer and the proxies are scale-invariant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["CharTransformer", "EmbeddingNet", "NormMLP", "ResNet"]


def _layers(dims: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if dims == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
    if dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d
    raise ValueError(f"Invalid dims: {dims!r}; allowed: 1, 2")


class BasicBlock(nn.Module):
    """``relu(x' + bn(conv(relu(bn(conv(x))))))``; ``x'`` is ``x`` or a 1x1 conv + BN shortcut."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        conv, norm, _ = _layers(dims)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(out)))


class ResNet(nn.Module):
    """A small ResNet: a conv-BN-ReLU stem, one :class:`BasicBlock` per width, average pooling.

    Stages after the first halve the resolution. ``features`` gives the pooled trunk output;
    ``forward`` adds the linear classifier (the one weight that is not scale-invariant).
    """

    def __init__(
        self, dims: int, in_channels: int, num_classes: int,
        widths: tuple[int, ...] = (16, 32, 64), stem_stride: int = 1,
    ) -> None:
        super().__init__()
        conv, norm, pool = _layers(dims)
        self.stem = nn.Sequential(
            conv(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False),
            norm(widths[0]), nn.ReLU(),
        )
        blocks = []
        for i, width in enumerate(widths):
            previous = widths[max(i - 1, 0)]
            blocks.append(BasicBlock(dims, previous, width, stride=1 if i == 0 else 2))
        self.blocks = nn.Sequential(*blocks)
        self.pool = pool(1)
        self.feature_dim = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes)

    def features(self, x: Tensor) -> Tensor:
        pooled: Tensor = self.pool(self.blocks(self.stem(x)))
        return pooled.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.fc(self.features(x))
        return logits


class NormMLP(nn.Module):
    """``depth`` blocks of ``Linear(bias=False) -> LayerNorm -> ReLU``, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden, bias=False), nn.LayerNorm(hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.net(x)
        return logits


def _wn_linear(in_features: int, out_features: int) -> nn.Module:
    """A weight-normalised ``Linear``: ``W = g * V / |V|`` row by row (``V`` scale-invariant)."""
    linear: nn.Module = weight_norm(  # torch leaves weight_norm's return type unannotated
        nn.Linear(in_features, out_features), name="weight", dim=0)
    return linear


class PostLNBlock(nn.Module):
    """``x = LN(x + Attn(x)); x = LN(x + FFN(x))`` with weight-normalised projections."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = _wn_linear(d_model, 3 * d_model)
        self.out = _wn_linear(d_model, d_model)
        self.ff1 = _wn_linear(d_model, d_ff)
        self.ff2 = _wn_linear(d_ff, d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def attention(self, x: Tensor) -> Tensor:
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=-1)
        q, k, v = (t.reshape(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: Tensor = self.out(y.transpose(1, 2).reshape(batch, length, d_model))
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(x + self.dropout(self.attention(x)))
        out: Tensor = self.ln2(x + self.dropout(self.ff2(F.gelu(self.ff1(x)))))
        return out


class CharTransformer(nn.Module):
    """A character-level causal Transformer with post-LN, weight-normalised blocks."""

    def __init__(
        self, vocab_size: int, context: int = 128, d_model: int = 128, n_heads: int = 4,
        n_layers: int = 2, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context = context
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(
            *[PostLNBlock(d_model, n_heads, 4 * d_model, dropout) for _ in range(n_layers)]
        )
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``[batch, length, vocab]`` for token ids ``[batch, length]``."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        logits: Tensor = self.head(self.blocks(self.token(ids) + self.position(positions)))
        return logits


class EmbeddingNet(nn.Module):
    """A 1-D ResNet trunk and an L2-normalised embedding, with L2-normalised class proxies.

    ``forward`` returns unit embeddings ``e = normalize(W f(x))``; :meth:`loss` is the normalised
    softmax (proxy) loss ``CE(s * <e, normalize(P_c)>, y)`` with scale ``s``.
    """

    def __init__(
        self, in_channels: int, num_train_classes: int, embedding_dim: int = 32,
        widths: tuple[int, ...] = (32, 64, 64), scale: float = 16.0,
    ) -> None:
        super().__init__()
        self.trunk = ResNet(1, in_channels, num_classes=1, widths=widths)
        del self.trunk.fc
        self.embed = nn.Linear(self.trunk.feature_dim, embedding_dim, bias=False)
        self.proxies = nn.Parameter(torch.randn(num_train_classes, embedding_dim))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.embed(self.trunk.features(x)), dim=1)

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        logits = embeddings @ F.normalize(self.proxies, dim=1).T
        return F.cross_entropy(self.scale * logits, labels)
