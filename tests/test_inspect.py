"""Tests for scaleinv.inspect: structural + numeric scale-invariance detection."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv import SGDP, AdamP
from scaleinv.inspect import (
    Invariance,
    InvarianceReport,
    find_scale_invariant,
    param_groups,
)
from scaleinv.monitor import StepSizeMonitor
from scaleinv.projection import select_view

torch.set_num_threads(1)


# -- models ------------------------------------------------------------------------------------


class BNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)  # a bias before BatchNorm is removed by it
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PreLNBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)): the LayerNorms come before the weights."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attention = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class RetrievalHead(nn.Module):
    """An embedding head whose output is L2-normalised."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.body = nn.Linear(10, 16)
        self.head = nn.Linear(16, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(F.relu(self.body(x))), dim=-1)


class WSConv2d(nn.Conv2d):
    """Weight-standardised convolution: each output channel's filter has mean 0, std 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class SignLayer(nn.Module):
    """sign(W x): invariant to positive per-row scaling, through an op no rule knows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4, bias=False)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sign(self.fc(x)))


class LogitsAndFeatures(nn.Module):
    """Returns (BN(fc(x)), fc(x)); a loss on the first output alone has a gradient orthogonal
    to fc.weight, but the second output scales with it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.fc(x)
        return self.bn(features), features


def images(batch: int = 4, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def weights_of(report: InvarianceReport) -> dict[str, str]:
    return {name: d.kind.value for name, d in report.details.items() if len(d.shape) >= 2}


# -- the kinds ---------------------------------------------------------------------------------


def test_invariance_is_a_str_enum_with_the_optimizer_annotation() -> None:
    assert Invariance("channel") is Invariance.CHANNEL
    assert Invariance.LAYER == "layer" and f"{Invariance.NONE}" == "none"
    assert str(Invariance.CHANNEL) == "channel"
    assert [k.scale_invariant for k in Invariance] == ["channel", "layer", False]


def test_cnn_with_batchnorm() -> None:
    torch.manual_seed(0)
    model = BNCNN()
    report = find_scale_invariant(model, images())
    assert list(report) == [name for name, _ in model.named_parameters()]
    assert weights_of(report) == {"conv1.weight": "channel", "conv2.weight": "channel",
                                  "fc.weight": "none"}
    assert all(report[n] is Invariance.NONE for n, p in model.named_parameters() if p.dim() < 2)
    assert report.reason("conv1.weight") == "conv1.weight -> bn1 (BatchNorm2d): per channel"
    assert report.reason("conv2.weight") == "conv2.weight -> bn2 (BatchNorm2d): per channel"
    assert report.disagreements() == []
    conv = report.details["conv1.weight"]
    assert conv.structural is conv.numeric is Invariance.CHANNEL
    assert conv.numeric_change["channel"] < 1e-3
    assert report.details["fc.weight"].numeric_change["layer"] > 1e-2
    # the cosine test picks the same on a real gradient here
    assert report.cosine_disagreements() == []
    assert conv.cosine_view == "channel"
    assert conv.max_cosines["channel"] < conv.thresholds["channel"]


def test_resnet_basic_blocks() -> None:
    torch.manual_seed(0)
    model = TinyResNet()
    report = find_scale_invariant(model, images())
    expected = {name: "channel" for name, p in model.named_parameters()
                if p.dim() == 4}
    expected["fc.weight"] = "none"
    assert weights_of(report) == expected
    assert "layer2.shortcut.0.weight" in expected
    assert report.reason("layer2.shortcut.0.weight").endswith(
        "-> layer2.shortcut.1 (BatchNorm2d): per channel")
    assert report.disagreements() == []


def test_pre_layernorm_transformer_block_has_no_invariant_weight() -> None:
    torch.manual_seed(0)
    report = find_scale_invariant(PreLNBlock(), torch.randn(2, 5, 16))
    assert set(weights_of(report).values()) == {"none"}
    assert report.disagreements() == []
    assert "gelu" in report.reason("fc1.weight")


def test_torch_transformer_layer_pre_norm() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=True)
    report = find_scale_invariant(layer, torch.randn(2, 5, 16))
    assert set(weights_of(report).values()) == {"none"}
    assert report.disagreements() == []


def test_mlp_without_normalization() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    report = find_scale_invariant(model, torch.randn(4, 6))
    assert set(report.values()) == {Invariance.NONE}
    assert report.disagreements() == []


def test_l2_normalised_output_makes_the_head_layer_invariant() -> None:
    torch.manual_seed(0)
    report = find_scale_invariant(RetrievalHead(bias=False), torch.randn(4, 10))
    assert weights_of(report) == {"body.weight": "none", "head.weight": "layer"}
    assert report.reason("head.weight").startswith("head.weight -> normalize: whole tensor")
    assert report.details["head.weight"].cosine_view == "layer"
    # with a bias the head is not invariant any more
    with_bias = find_scale_invariant(RetrievalHead(bias=True), torch.randn(4, 10))
    assert weights_of(with_bias)["head.weight"] == "none"
    assert with_bias.disagreements() == []


def test_weight_normalised_layer() -> None:
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(6, 4))
    report = find_scale_invariant(nn.Sequential(layer, nn.Tanh()), torch.randn(5, 6))
    assert report["0.parametrizations.weight.original1"] is Invariance.CHANNEL  # direction v
    assert report["0.parametrizations.weight.original0"] is Invariance.NONE  # magnitude g
    assert "_WeightNorm" in report.reason("0.parametrizations.weight.original1")
    assert report.disagreements() == []


def test_old_style_weight_norm() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = nn.utils.weight_norm(nn.Linear(6, 4))
    report = find_scale_invariant(nn.Sequential(layer, nn.Tanh()), torch.randn(5, 6))
    assert report["0.weight_v"] is Invariance.CHANNEL
    assert report["0.weight_g"] is Invariance.NONE


def _first_weight_case(name: str) -> tuple[nn.Module, torch.Tensor]:
    x4, x2 = torch.randn(4, 3, 7, 7), torch.randn(6, 6)
    cases = {
        "groupnorm, 4 channels per group": (
            nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.GroupNorm(2, 8)), x4),
        "groupnorm, 4 channels per group, conv bias": (
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)), x4),
        "groupnorm, 1 channel per group, conv bias": (
            nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(8, 8)), x4),
        "linear with bias, layernorm": (nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8)), x2),
        "linear without bias, layernorm": (
            nn.Sequential(nn.Linear(6, 8, bias=False), nn.LayerNorm(8)), x2),
        "linear without bias, rmsnorm": (
            nn.Sequential(nn.Linear(6, 8, bias=False), nn.RMSNorm(8)), x2),
        "conv, relu, batchnorm": (
            nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(4)), x4),
        "conv with bias, relu, batchnorm": (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), x4),
        "conv with bias, batchnorm": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x4),
        "weight standardisation": (nn.Sequential(WSConv2d(3, 4, 3), nn.Tanh()), x4),
        "instance norm": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)), x4),
        "embedding, layernorm": (
            nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8)), torch.randint(0, 10, (3, 5))),
        "spectral norm": (
            nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(6, 4, bias=False)),
                          nn.Tanh()), x2),
        "linear, flatten, batchnorm1d": (
            nn.Sequential(nn.Conv2d(3, 2, 3, bias=False), nn.Flatten(), nn.BatchNorm1d(50)), x4),
    }
    return cases[name]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("groupnorm, 4 channels per group", "layer"),
        ("groupnorm, 4 channels per group, conv bias", "none"),
        ("groupnorm, 1 channel per group, conv bias", "channel"),
        ("linear with bias, layernorm", "none"),
        ("linear without bias, layernorm", "layer"),
        ("linear without bias, rmsnorm", "layer"),
        ("conv, relu, batchnorm", "channel"),
        ("conv with bias, relu, batchnorm", "none"),
        ("conv with bias, batchnorm", "channel"),
        ("weight standardisation", "channel"),
        ("instance norm", "channel"),
        ("embedding, layernorm", "channel"),
        ("spectral norm", "layer"),
        ("linear, flatten, batchnorm1d", "channel"),
    ],
)
def test_cases_that_fool_simple_rules(case: str, expected: str) -> None:
    torch.manual_seed(0)
    model, x = _first_weight_case(case)
    report = find_scale_invariant(model, x)
    name = next(n for n, p in model.named_parameters() if p.dim() >= 2)
    detail = report.details[name]
    assert detail.kind.value == expected, report.reason(name)
    assert detail.structural is detail.numeric, report.reason(name)


# -- structure against numbers against the cosine test ----------------------------------------


def test_numeric_check_overrules_a_structure_that_misses_invariance() -> None:
    torch.manual_seed(0)
    report = find_scale_invariant(SignLayer(), torch.randn(5, 6))
    detail = report.details["fc.weight"]
    assert detail.structural is Invariance.NONE
    assert detail.numeric is detail.kind is Invariance.CHANNEL
    assert report.disagreements() == ["fc.weight"]
    assert "the numeric result is used" in report.reason("fc.weight")
    assert "structure disagrees" in report.table()


def test_numeric_check_overrules_a_structure_that_claims_too_much() -> None:
    torch.manual_seed(0)  # BatchNorm with a huge eps is far from invariant
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4, eps=100.0))
    report = find_scale_invariant(model, torch.randn(5, 6))
    assert report.details["0.weight"].structural is Invariance.CHANNEL
    assert report["0.weight"] is Invariance.NONE
    assert report.disagreements() == ["0.weight"]


def test_cosine_test_disagreement_is_reported() -> None:
    torch.manual_seed(0)
    model = LogitsAndFeatures()
    weights = torch.randn(8, 4)
    report = find_scale_invariant(
        model, torch.randn(8, 6), loss_fn=lambda out: (out[0] * weights).sum()
    )
    detail = report.details["fc.weight"]
    assert detail.kind is Invariance.NONE  # the features output scales with fc.weight
    assert detail.cosine_view == "channel"  # but the loss's gradient is orthogonal to it
    assert report.cosine_disagreements() == ["fc.weight"]
    assert "cosine test disagrees" in str(report)


def test_report_is_a_mapping_with_a_table() -> None:
    torch.manual_seed(0)
    model = BNCNN()
    report = find_scale_invariant(model, images())
    assert dict(report) == {n: report[n] for n, _ in model.named_parameters()}
    assert len(report) == len(list(model.parameters()))
    text = report.table()
    assert text.splitlines()[0].split()[:3] == ["parameter", "shape", "invariance"]
    for name, _ in model.named_parameters():
        assert name in text
    assert "conv1.weight -> bn1 (BatchNorm2d): per channel" in text
    assert "InvarianceReport(" in repr(report)


# -- leaving the model as found ----------------------------------------------------------------


def test_inspection_leaves_model_as_found() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.3), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2))
    model.eval()
    model[1].train()
    x = images()
    model(x).sum().backward()
    model[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    report = find_scale_invariant(model, x)

    assert report["0.weight"] is Invariance.CHANNEL
    assert report.details["0.weight"].cosine_view is None  # frozen: no gradient
    for key, value in model.state_dict().items():  # parameters and running statistics
        assert torch.equal(value, state[key]), key
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model[0].weight.requires_grad


def test_example_inputs_forms() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4, bias=False)
            self.norm = nn.LayerNorm(4)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.norm(self.a(x)) * scale

    torch.manual_seed(0)
    x, s = torch.randn(5, 3), torch.tensor(2.0)
    by_tuple = find_scale_invariant(TwoInputs(), (x, s))
    by_dict = find_scale_invariant(TwoInputs(), {"x": x, "scale": s})
    assert by_tuple["a.weight"] is by_dict["a.weight"] is Invariance.LAYER


def test_bad_arguments() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="model"):
        find_scale_invariant("not a model", torch.randn(2, 3))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example_inputs"):
        find_scale_invariant(model, 3.0)
    with pytest.raises(ValueError, match="rtol"):
        find_scale_invariant(model, torch.randn(2, 3), rtol=0)
    with pytest.raises(ValueError, match="delta"):
        find_scale_invariant(model, torch.randn(2, 3), delta=-1.0)
    with pytest.raises(ValueError, match="loss_fn"):
        find_scale_invariant(model, torch.randn(2, 3), loss_fn=lambda out: out)


# -- param groups ------------------------------------------------------------------------------


def test_param_groups_from_the_inspection() -> None:
    torch.manual_seed(0)
    model = BNCNN()
    groups = param_groups(model, images(), options={"1d": {"weight_decay": 0.0},
                                                   "channel": {"lr": 0.5}})
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [[by_id[id(p)] for p in g["params"]] for g in groups]
    assert names == [
        ["conv1.weight", "conv2.weight"],
        ["fc.weight"],
        ["bn1.weight", "bn1.bias", "conv2.bias", "bn2.weight", "bn2.bias", "fc.bias"],
    ]
    assert [g["scale_invariant"] for g in groups] == ["channel", False, False]
    assert groups[0]["lr"] == 0.5 and groups[2]["weight_decay"] == 0.0
    assert "weight_decay" not in groups[0]
    optimizer = AdamP(groups, lr=1e-3, weight_decay=1e-2)
    assert [g["scale_invariant"] for g in optimizer.param_groups] == ["channel", False, False]


def test_param_groups_from_a_given_mapping() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.LayerNorm(4))
    groups = param_groups(model, invariance={"0.weight": "layer"})
    assert [g["scale_invariant"] for g in groups] == ["layer", False]
    groups = param_groups(model, invariance={})
    assert [g["scale_invariant"] for g in groups] == [False, False]


def test_param_groups_bad_arguments() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="options"):
        param_groups(model, invariance={}, options={"bias": {}})
    with pytest.raises(ValueError, match="params"):
        param_groups(model, invariance={}, options={"1d": {"params": []}})
    with pytest.raises(ValueError, match="example_inputs"):
        param_groups(model)
    with pytest.raises(ValueError, match="kind"):
        param_groups(model, invariance={"weight": "sideways"})


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    x = images(8)
    target = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()


@pytest.mark.parametrize(
    ("make", "foreach"),
    [(lambda g, f: AdamP(g, lr=1e-2, weight_decay=1e-2, foreach=f), False),
     (lambda g, f: AdamP(g, lr=1e-2, weight_decay=1e-2, foreach=f), True),
     (lambda g, f: SGDP(g, lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=f), False),
     (lambda g, f: SGDP(g, lr=0.1, momentum=0.9, nesterov=True, foreach=f), True)],
)
def test_annotated_groups_agree_with_auto_where_the_cosine_test_agrees(make, foreach) -> None:
    torch.manual_seed(0)
    annotated_model = BNCNN()
    auto_model = BNCNN()
    auto_model.load_state_dict(annotated_model.state_dict())
    report = find_scale_invariant(annotated_model, images())
    options = {"1d": {"weight_decay": 0.0}}
    annotated = make(param_groups(annotated_model, invariance=report, options=options), foreach)
    auto_groups = [dict(g, scale_invariant="auto")
                   for g in param_groups(auto_model, invariance=report, options=options)]
    auto = make(auto_groups, foreach)
    monitor = StepSizeMonitor(auto_model, auto, invariance=report)

    _train(annotated_model, annotated, steps=4)
    _train(auto_model, auto, steps=4)

    # the premise: on every step the cosine test chose what the annotation says
    for record in monitor.records:
        expected = None if record["kind"] == "none" else record["kind"]
        assert record["view"] == expected, record
    for (name, a), b in zip(annotated_model.named_parameters(), auto_model.parameters(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_select_view_is_the_cosine_test_reported() -> None:
    torch.manual_seed(0)
    model = BNCNN()
    report = find_scale_invariant(model, images(), loss_fn=lambda out: out.square().mean())
    model.train()
    model.zero_grad()
    torch.manual_seed(0)
    model(images()).square().mean().backward()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert report.details[name].cosine_view == select_view(
                p.detach(), p.grad, "auto", 0.1, 1e-8), name


def test_empty_parameters_are_never_tested_or_grouped_for_projection() -> None:
    """Zero-size parameters (``[0, 5]``, ``[2, 3, 0, 2]``) are reported ``none`` and land in a
    group that is never projected; the others are inspected as usual."""

    class WithEmpty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.empty = nn.Parameter(torch.zeros(0, 5))
            self.hollow = nn.Parameter(torch.zeros(2, 3, 0, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.empty.sum() + self.hollow.sum()

    model = WithEmpty()
    report = find_scale_invariant(model, torch.randn(2, 3, 8, 8))
    assert report["empty"] == Invariance.NONE
    assert "empty" in report.details["empty"].reason
    assert report["hollow"] == Invariance.NONE
    assert report["conv.weight"] == Invariance.CHANNEL
    groups = param_groups(model, invariance=report)
    unprojected = [p for g in groups if g["scale_invariant"] is False for p in g["params"]]
    assert any(p is model.empty for p in unprojected)
    assert any(p is model.hollow for p in unprojected)
