"""ParamLayout: which parameters adapt, and the flat [..., P] layout's unflatten / pack pair."""
import torch

from metakernels.layout import ParamLayout


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 5)
        self.emb = torch.nn.Embedding(4, 2)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))


def _layout():
    torch.manual_seed(0)
    return ParamLayout(_Net().double())


def test_unflatten_gives_views_in_model_order_and_flatten_inverts_it():
    layout = _layout()
    assert layout.names == ["scale", "lin.weight", "lin.bias", "emb.weight"] and layout.numel == 1 + 15 + 5 + 8
    flat = torch.arange(2 * layout.numel, dtype=torch.float64).reshape(2, layout.numel)
    parts = layout.unflatten(flat)
    assert [tuple(p.shape) for p in parts.values()] == [(2,), (2, 5, 3), (2, 5), (2, 4, 2)]
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in parts.values())
    assert torch.equal(parts["emb.weight"][1].reshape(-1), flat[1, 21:29])
    assert torch.equal(layout.flatten({n: p[1] for n, p in parts.items()}), flat[1])
    assert torch.equal(layout.flatten(), torch.cat([p.detach().reshape(-1) for p in layout.parameters()]))


def test_unflatten_is_differentiable_to_second_order():
    layout = _layout()
    flat = torch.randn(3, layout.numel, dtype=torch.float64, requires_grad=True)

    def f(x):  # transposed, broadcast and unused parts: the pack copies any strides, zero-fills None
        p = layout.unflatten(x)
        return (p["lin.weight"].transpose(-1, -2) ** 2).sum(-1), p["scale"].unsqueeze(-1).expand(3, 4) * p["lin.bias"][:, :4]

    torch.autograd.gradcheck(f, (flat,))
    torch.autograd.gradgradcheck(f, (flat,))


def test_pack_writes_zeros_for_parameters_without_a_gradient():
    layout = _layout()
    flat = torch.randn(2, layout.numel, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(layout.unflatten(flat)["lin.bias"].sum(), flat)
    assert torch.equal(g[:, 16:21], torch.ones(2, 5, dtype=torch.float64))
    assert torch.count_nonzero(g[:, :16]) == 0 and torch.count_nonzero(g[:, 21:]) == 0
