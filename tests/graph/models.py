"""Small models shared by the graph/passes/backends tests."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head, self.bn3 = nn.Linear(8, 6), nn.BatchNorm1d(6)
        for bn in (self.bn1, self.bn2, self.bn3):  # non-trivial statistics so folding has work to do
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.head(x.mean(dim=(2, 3))))


def cnn() -> nn.Module:
    return SmallCNN().eval()


class TaskArithmetic(nn.Module):
    """base + Σ λᵢ·τᵢ computed in forward, then functional_call — the shape of a functional merge module."""

    def __init__(self, base: nn.Module, n_tasks: int = 3, lambdas=(0.3, 0.7, -0.25)):
        super().__init__()
        torch.manual_seed(1)
        self.base = base
        self.names = [n for n, _ in base.named_parameters()]
        self.base_params = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(p.detach().clone())
                                             for n, p in base.named_parameters()})
        self.taus = nn.ParameterList([nn.Parameter(torch.randn_like(p) * 0.1) for _ in range(n_tasks)
                                      for _, p in base.named_parameters()])
        self.lambdas = nn.Parameter(torch.tensor(lambdas[:n_tasks]))

    def merged_params(self) -> dict:
        out, k = {}, len(self.names)
        for j, name in enumerate(self.names):
            w = self.base_params[name.replace(".", "_")]
            for t in range(self.lambdas.numel()):
                w = w + self.lambdas[t] * self.taus[t * k + j]
            out[name] = w
        return out

    def forward(self, x):
        return functional_call(self.base, self.merged_params(), (x,))


class LoRALinear(nn.Module):
    """y = base(x) + Σₐ sₐ · B_a(A_a(x)) with several adapters applied at run time (PEFT's layout)."""

    def __init__(self, d_in, d_out, ranks=(4, 2), scales=(0.5, 2.0)):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.A = nn.ModuleList([nn.Linear(d_in, r, bias=False) for r in ranks])
        self.B = nn.ModuleList([nn.Linear(r, d_out, bias=False) for r in ranks])
        self.scales = scales
        for b in self.B:
            nn.init.normal_(b.weight, std=0.2)

    def forward(self, x):
        y = self.base(x)
        for a, b, s in zip(self.A, self.B, self.scales):
            y = y + b(a(x)) * s
        return y

    def merged_weight(self):
        w = self.base.weight.detach().clone()
        for a, b, s in zip(self.A, self.B, self.scales):
            w += s * (b.weight @ a.weight).detach()
        return w


def lora_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(LoRALinear(8, 16), nn.ReLU(), LoRALinear(16, 4, ranks=(3,), scales=(1.5,))).eval()


def tiny_bert():
    """A 2-layer BERT encoder from a transformers config, random weights, eager attention (explicit Q·Kᵀ, P·V)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertModel(config, add_pooling_layer=False).eval()


class BertHidden(nn.Module):
    """Wraps a HF encoder so it maps (input_ids, attention_mask) → last_hidden_state."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
