"""AdamP on an ordinary pre-LN Transformer: where the cosine test fires on weights that are not
scale-invariant, and how param_groups(...) prevents it. Run: python caveat.py (about 10 s)."""
import torch
from torch import nn

from scaleinv import AdamP
from scaleinv.inspect import find_scale_invariant, param_groups
from scaleinv.monitor import StepSizeMonitor

torch.manual_seed(0)
torch.set_num_threads(1)
vocab, d, ctx = 64, 64, 32


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.norm(self.blocks(self.embed(x), mask=mask, is_causal=True)))


data = torch.randint(0, vocab, (4096,))
data = (data.cumsum(0) % vocab)  # a learnable sequence


def batch(g):
    s = torch.randint(0, len(data) - ctx - 1, (16,), generator=g)
    w = data[s[:, None] + torch.arange(ctx + 1)]
    return w[:, :-1], w[:, 1:]


for label in ("AdamP(model.parameters())", "AdamP(param_groups(model, x))"):
    torch.manual_seed(0)
    model = TinyLM()
    x, _ = batch(torch.Generator().manual_seed(1))
    report = find_scale_invariant(model, x)
    grouped = "groups" in label
    params = param_groups(model, invariance=report) if grouped else model.parameters()
    opt = AdamP(params, lr=1e-3, weight_decay=1e-2)
    mon = StepSizeMonitor(model, opt, invariance=report)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        xb, yb = batch(g)
        loss = nn.functional.cross_entropy(model(xb).flatten(0, 1), yb.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    mon.close()
    counts = {}
    for r in mon.records:
        if r["projected"]:
            counts[r["name"]] = counts.get(r["name"], 0) + 1
    kinds = {n: str(report[n]) for n in counts}
    print(label, "loss", round(loss.item(), 3))
    invariant = [n for n in report if str(report[n]) in ("channel", "layer")]
    print("  invariant per inspector:", invariant)
    print("  projected steps of 100:", {n: (c, kinds[n]) for n, c in counts.items()})
