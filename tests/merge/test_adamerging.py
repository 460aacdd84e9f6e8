"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575) on a 4-task suite built from scikit-learn's digits.

Suite: a shared MLP body is pretrained briefly on all ten digits (the "foundation model"); each task is a
5-way classification of a different digit subset ({0-4}, {5-9}, evens, odds) with its own frozen head (a
linear probe on the pretrained features, like CLIP's zero-shot heads in the paper); each expert fine-tunes
the body only, on its task's training split. Protocol: task arithmetic's λ is chosen with labels on the
validation split from a grid, AdaMerging learns λ from the *unlabelled* validation inputs, and both are
scored on the held-out test split.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchmerge.merge.adamerging import AdaMergingOptions, adamerge, prediction_entropy
from torchmerge.merge.base import MergeError
from torchmerge.merge.functional import FunctionalMerge, task_vectors

SUBSETS = ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 2, 4, 6, 8], [1, 3, 5, 7, 9])
HIDDEN = 64
TA_GRID = [round(0.05 * k, 2) for k in range(1, 21)]  # 0.05 … 1.0


class Body(nn.Module):
    """64 → 64 → 64 → 64 MLP with L2-normalised output (CLIP-like features)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


class CosineHead(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(classes, HIDDEN))

    def forward(self, z):
        return 10.0 * z @ F.normalize(self.weight, dim=-1).T


def _fit(loss_fn, steps, opt):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


class Suite:
    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits

        torch.manual_seed(seed)
        x, y = load_digits(return_X_y=True)
        self.x = torch.tensor(x, dtype=torch.float32) / 16.0
        self.y = torch.tensor(y)
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))
        n = len(order)
        self.splits = {"train": order[: n // 2], "val": order[n // 2 : 3 * n // 4], "test": order[3 * n // 4 :]}
        self.base = Body()
        head = CosineHead(10)
        xs, ys = self.x[self.splits["train"]], self.y[self.splits["train"]]
        params = list(self.base.parameters()) + list(head.parameters())
        _fit(lambda: F.cross_entropy(head(self.base(xs)), ys), 5, torch.optim.Adam(params, lr=1e-2))
        self.base.requires_grad_(False).zero_grad(set_to_none=True)
        self.experts, self.heads = [], []
        for t in range(len(SUBSETS)):
            xt, yt = self.data(t, "train")
            with torch.no_grad():
                features = self.base(xt)
            probe = CosineHead(len(SUBSETS[t]))
            _fit(lambda: F.cross_entropy(probe(features), yt), 100, torch.optim.Adam(probe.parameters(), lr=0.1))
            probe.weight.grad = None
            probe.requires_grad_(False)
            expert = copy.deepcopy(self.base).requires_grad_(True)
            opt = torch.optim.SGD(expert.parameters(), lr=0.1, momentum=0.9)
            _fit(lambda: F.cross_entropy(probe(expert(xt)), yt), 100, opt)
            expert.zero_grad(set_to_none=True)
            self.experts.append(expert.requires_grad_(False))
            self.heads.append(probe)

    def data(self, task: int, split: str):
        idx = self.splits[split]
        idx = idx[torch.isin(self.y[idx], torch.tensor(SUBSETS[task]))]
        labels = torch.tensor([SUBSETS[task].index(int(v)) for v in self.y[idx]])
        return self.x[idx], labels

    @torch.no_grad()
    def accuracy(self, body, split: str) -> list[float]:
        out = []
        for t in range(len(SUBSETS)):
            xt, yt = self.data(t, split)
            out.append((self.heads[t](body(xt)).argmax(-1) == yt).float().mean().item())
        return out

    def unlabeled(self, split: str):
        return [self.data(t, split)[0] for t in range(len(SUBSETS))]


def _mean(values):
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def suite():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and polite on shared cores
    try:
        yield Suite(seed=0)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def layerwise(suite):
    losses = []
    options = AdaMergingOptions(coefficients="layer", steps=100, lr=1e-2, callback=lambda step, loss: losses.append(loss))
    merged = adamerge(suite.base, suite.experts, suite.unlabeled("val"), heads=suite.heads, options=options)
    return merged, losses


def test_layerwise_adamerging_beats_tuned_task_arithmetic(suite, layerwise):
    vectors = task_vectors(suite.base, suite.experts)
    best_lam = max(TA_GRID, key=lambda lam: _mean(suite.accuracy(FunctionalMerge(suite.base, vectors, init=lam), "val")))
    ta = suite.accuracy(FunctionalMerge(suite.base, vectors, init=best_lam), "test")
    ada = suite.accuracy(layerwise[0], "test")
    taskwise = adamerge(
        suite.base, suite.experts, suite.unlabeled("val"), heads=suite.heads,
        options=AdaMergingOptions(coefficients="task", steps=100, lr=1e-2),
    )
    tw = suite.accuracy(taskwise, "test")
    base = suite.accuracy(suite.base, "test")
    experts = [suite.accuracy(e, "test")[t] for t, e in enumerate(suite.experts)]
    print(
        f"\n[digits, 4 tasks, test split] pretrained {_mean(base):.4f} | individual experts {_mean(experts):.4f}"
        f"\n  task arithmetic (λ={best_lam} chosen on val from {TA_GRID[0]}..{TA_GRID[-1]}): {_mean(ta):.4f} "
        f"per task {[round(a, 3) for a in ta]}"
        f"\n  AdaMerging task-wise:  {_mean(tw):.4f} per task {[round(a, 3) for a in tw]}"
        f"\n  AdaMerging layer-wise: {_mean(ada):.4f} per task {[round(a, 3) for a in ada]}"
    )
    assert _mean(ada) > _mean(ta), (
        f"layer-wise AdaMerging mean test accuracy {_mean(ada):.4f} does not beat task arithmetic "
        f"{_mean(ta):.4f} (λ={best_lam})"
    )


def test_entropy_decreases_and_coefficients_stay_in_bounds(suite, layerwise):
    merged, losses = layerwise
    assert len(losses) == 100
    assert losses[-1] < losses[0], f"entropy went from {losses[0]:.4f} to {losses[-1]:.4f}"
    lam = merged.coefficients.detach()
    assert lam.min() >= 0.0 and lam.max() <= 1.0, f"λ outside [0, 1]: min {lam.min()}, max {lam.max()}"
    assert not torch.all(lam == 0.3), "λ never moved from its initial value 0.3"


def test_coefficient_counts_task_layer_block(suite, layerwise):
    tasks, tensors = len(SUBSETS), len(list(suite.base.parameters()))
    one_step = dict(steps=1, lr=1e-2)
    unl = suite.unlabeled("val")
    tw = adamerge(suite.base, suite.experts, unl, heads=suite.heads, options=AdaMergingOptions(coefficients="task", **one_step))
    assert tw.coefficients.numel() == tasks
    assert layerwise[0].coefficients.shape == (tasks, tensors)  # 3 Linear layers: 6 tensors
    blocks = AdaMergingOptions(coefficients="block", groups=["net.0", "net.2", "net.4"], **one_step)
    bw = adamerge(suite.base, suite.experts, unl, heads=suite.heads, options=blocks)
    assert bw.coefficients.shape == (tasks, 3) and bw.group_names == ("net.0", "net.2", "net.4")


def test_task_vectors_batches_and_no_side_effects(suite):
    before = [h.weight.clone() for h in suite.heads]
    vectors = task_vectors(suite.base, suite.experts)
    # task vectors instead of experts, and lists of (tuple) mini-batches instead of one full batch
    batches = [[(x[:64],), (x[64:],)] for x in suite.unlabeled("val")]
    merged = adamerge(suite.base, vectors, batches, heads=suite.heads, options=AdaMergingOptions(steps=3, lr=1e-2))
    assert merged.coefficients.shape == (len(SUBSETS), 6)
    assert all(h.weight.grad is None and torch.equal(h.weight, b) for h, b in zip(suite.heads, before))
    assert all(p.grad is None for p in suite.base.parameters())


def test_prediction_entropy_formula():
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    # rows: uniform over 2 classes (ln 2) and one-hot (0); mean (ln 2) / 2
    assert torch.allclose(prediction_entropy(logits), torch.log(torch.tensor(2.0)) / 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coefficients="model"), "AdaMergingOptions.coefficients: got 'model'"),
        (dict(coefficients="block"), "AdaMergingOptions.groups: coefficients='block' needs"),
        (dict(steps=-1), r"AdaMergingOptions.steps: got -1; valid: an integer >= 0"),
        (dict(lr=0.0), r"AdaMergingOptions.lr: got 0.0; valid: a number > 0"),
        (dict(init=1.5), r"AdaMergingOptions.init: got 1.5; valid: a number in \[0.0, 1.0\]"),
    ],
)
def test_option_errors(kwargs, match):
    with pytest.raises(MergeError, match=match):
        AdaMergingOptions(**kwargs)


def test_argument_errors(suite):
    unl = suite.unlabeled("val")
    with pytest.raises(MergeError, match=r"unlabeled_batches_per_task: 3 entries; valid: one per task \(4\)"):
        adamerge(suite.base, suite.experts, unl[:3])
    with pytest.raises(MergeError, match=r"heads: 2 entries; valid: one per task \(4\) or None"):
        adamerge(suite.base, suite.experts, unl, heads=suite.heads[:2])
    with pytest.raises(MergeError, match=r"experts_or_task_vectors\[0\]: got str"):
        adamerge(suite.base, ["expert.pt"], unl[:1])
    with pytest.raises(MergeError, match=r"unlabeled_batches_per_task\[0\]: yielded no batch"):
        adamerge(suite.base, suite.experts[:1], [[]], options=AdaMergingOptions(steps=1))


def test_learned_merge_folds_to_constants_bit_exactly(suite, layerwise):
    fold = pytest.importorskip("torchmerge.passes.fold_merged_weights")
    from torchmerge.graph.capture import capture

    merged = layerwise[0].eval()
    x = suite.unlabeled("test")[0]
    gm = capture(merged, (x,))
    result = fold.FoldMergedWeights()(gm)
    assert result.modified
    ops = {getattr(n.target, "overloadpacket", None) for n in result.gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.mul not in ops, "the λ·τ products were not folded away"
    constants = [t for _, t in result.gm.named_buffers()]
    state = merged.merged_state_dict()
    for name in merged.param_names:
        diffs = [(c - state[name]).abs().max().item() for c in constants if c.shape == state[name].shape]
        assert 0.0 in diffs, f"no folded constant equals merged {name!r}; smallest difference {min(diffs)}"
    out = result.gm(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.equal(out, merged.merged_module()(x))
