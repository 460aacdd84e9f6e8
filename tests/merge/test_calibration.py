import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from torchmerge.merge.base import MergeError
from torchmerge.merge.calibration import compute_fisher, compute_gram, save_fisher, save_gram, save_statistics


def test_fisher_matches_hand_gradients_of_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    samples = [(torch.randn(3), torch.randn(2)) for _ in range(4)]

    def loss_fn(m, batch):
        x, t = batch
        return 0.5 * ((m(x) - t) ** 2).sum()

    model.train()
    fisher = compute_fisher(model, samples, loss_fn)
    assert model.training  # mode restored
    # L = ½‖Wx + b − t‖²  ⇒  ∂L/∂W = (y − t) xᵀ,  ∂L/∂b = y − t
    w, b = model.weight.detach(), model.bias.detach()
    gw = [torch.outer(w @ x + b - t, x) for x, t in samples]
    gb = [w @ x + b - t for x, t in samples]
    torch.testing.assert_close(fisher["weight"], sum(g ** 2 for g in gw) / 4)
    torch.testing.assert_close(fisher["bias"], sum(g ** 2 for g in gb) / 4)
    assert model.weight.grad is None  # .grad untouched


def test_gram_of_every_linear_keyed_by_weight_name():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(5, 3), torch.randn(2, 6, 3)]  # 3-D inputs are flattened to rows
    gram = compute_gram(model, batches)
    assert set(gram) == {"0.weight", "2.weight"}
    rows = torch.cat([b.reshape(-1, 3) for b in batches])
    hidden = torch.relu(model[0](rows)).detach()
    torch.testing.assert_close(gram["0.weight"], rows.T @ rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gram["2.weight"], hidden.T @ hidden, rtol=1e-5, atol=1e-5)
    assert not model[0]._forward_pre_hooks  # hooks removed


def test_mapping_batches_are_keyword_arguments():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2, bias=False)

        def forward(self, inputs):
            return self.proj(inputs)

    x = torch.tensor([[1.0, 2.0]])
    gram = compute_gram(Net(), [{"inputs": x}])
    torch.testing.assert_close(gram["proj.weight"], x.T @ x)


def test_save_roundtrip_and_errors(tmp_path):
    stats = {"a.weight": torch.ones(2, 2)}
    path = save_gram(stats, tmp_path / "g.safetensors")
    torch.testing.assert_close(load_file(str(path))["a.weight"], stats["a.weight"])
    save_fisher(stats, tmp_path / "sub" / "f.safetensors")
    with pytest.raises(MergeError, match=".safetensors"):
        save_statistics(stats, tmp_path / "f.bin", "fisher")
    with pytest.raises(MergeError, match="no batches"):
        compute_gram(nn.Linear(2, 2), [])
    with pytest.raises(MergeError, match="no nn.Linear"):
        compute_gram(nn.ReLU(), [torch.ones(1)])
