"""ParamLayout: which parameters adapt, and the flat [..., P] layout's unflatten / pack pair."""
import re

import pytest
import torch

import metakernels as mk

from metakernels import compat
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


def test_unflatten_for_update_is_differentiable_to_second_order():
    """Views and the flat output of one node: their cotangents meet in one backward (the views' packed onto
    the flat one's), to any order, whether the views or the flat output or both are used."""
    layout = _layout()
    flat = torch.randn(3, layout.numel, dtype=torch.float64, requires_grad=True)

    def f(x):
        views, same = layout.unflatten_for_update(x, 3)
        return (views["lin.weight"].transpose(-1, -2) ** 2).sum(-1), same.sin() * views["scale"].unsqueeze(-1)

    def only_flat(x):
        return layout.unflatten_for_update(x, 3)[1].cos()

    for fn in (f, only_flat):
        torch.autograd.gradcheck(fn, (flat,))
        torch.autograd.gradgradcheck(fn, (flat,))
    shared = flat[0].detach()  # [P] weights shared by the tasks: views of 3 rows, the update starts from them
    views, base = layout.unflatten_for_update(shared, 3)
    assert base is shared and views["lin.weight"].shape == (3, 5, 3)


def test_pack_onto_adds_in_the_flat_layout_and_broadcasts_a_shared_base():
    layout = _layout()
    parts = [torch.randn(2, *s, dtype=torch.float64) for s in layout.shapes]
    parts[2] = None  # lin.bias: no gradient
    flat_parts = torch.cat([(torch.zeros(2, n, dtype=torch.float64) if p is None else p.reshape(2, -1))
                            for p, n in zip(parts, layout.numels)], dim=1)
    for onto in (torch.randn(2, layout.numel, dtype=torch.float64), torch.randn(layout.numel, dtype=torch.float64),
                 torch.randn(layout.numel, dtype=torch.float64).expand(2, -1)):
        assert torch.equal(layout.pack(parts, onto=onto), onto + flat_parts)
    assert torch.equal(layout.pack(parts, onto=None), flat_parts)


def test_pack_onto_is_differentiable_to_second_order():
    layout = _layout()
    parts = tuple(torch.randn(2, *s, dtype=torch.float64, requires_grad=True) for s in layout.shapes)
    for onto in (torch.randn(2, layout.numel, dtype=torch.float64, requires_grad=True),
                 torch.randn(layout.numel, dtype=torch.float64, requires_grad=True)):
        fn = lambda o, *p: layout.pack(p, onto=o).pow(2)  # noqa: E731
        torch.autograd.gradcheck(fn, (onto, *parts))
        torch.autograd.gradgradcheck(fn, (onto, *parts))


def test_the_update_and_the_views_cotangents_meet_without_a_separate_flat_add():
    """The inner update's base is the unflatten node's flat output: in the backward its cotangent and the
    views' are combined by the pack itself, so autograd never adds two [T, P] tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layout = _layout()
    flat = torch.randn(3, layout.numel, dtype=torch.float64, requires_grad=True)
    views, same = layout.unflatten_for_update(flat, 3)
    grads = torch.autograd.grad((views["lin.weight"] ** 3).sum(), tuple(views.values()), create_graph=True,
                                allow_unused=True)
    updated = layout.pack(grads, onto=same)
    full_adds = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and args[0].shape == flat.shape:
                full_adds.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        (g,) = torch.autograd.grad(updated.sum(), flat)
    assert full_adds == []
    (want,) = torch.autograd.grad((flat + torch.autograd.grad((layout.unflatten(flat)["lin.weight"] ** 3).sum(), flat,
                                                               create_graph=True)[0]).sum(), flat)
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_adapted_parameters_of_two_dtypes_are_refused_and_a_frozen_odd_one_is_not():
    """torch.cat would silently promote the float32 weights to the float64 one's dtype."""
    net = _Net()
    net.scale.data = net.scale.data.double()
    with pytest.raises(ValueError, match=r"share one dtype .*'scale' has torch.float64, 'lin.weight' has torch.float32"):
        ParamLayout(net)
    with pytest.raises(ValueError, match="share one dtype"):
        mk.MAML(net)
    assert ParamLayout(net, adapt=lambda name, p: name != "scale").names == ["lin.weight", "lin.bias", "emb.weight"]
    net.scale.requires_grad_(False)
    assert ParamLayout(net).names == ["lin.weight", "lin.bias", "emb.weight"]


def test_an_adapted_complex_parameter_is_refused():
    net = _Net()
    net.scale = torch.nn.Parameter(torch.tensor(1 + 2j))
    with pytest.raises(TypeError, match=r"'scale' has dtype torch.complex64; adapted parameters must be real floating"):
        ParamLayout(net)


def test_an_adapted_sparse_embedding_is_refused_and_an_unadapted_one_is_not():
    net = _Net()
    net.emb.sparse = True
    with pytest.raises(ValueError, match=r"module 'emb' \(Embedding\) has sparse=True.*sparse=False"):
        ParamLayout(net)
    with pytest.raises(ValueError, match="sparse=True"):
        mk.LearnedOptimizerTrainer(mk.LearnedOptimizer(hidden=4), net)
    assert ParamLayout(net, adapt=["lin.weight"]).names == ["lin.weight"]


@pytest.mark.parametrize("module", [torch.nn.Embedding(10, 4, max_norm=1.0),
                                    torch.nn.EmbeddingBag(10, 4, max_norm=1.0, mode="mean")], ids=["Embedding", "Bag"])
def test_an_adapted_embedding_with_max_norm_is_refused_and_an_unadapted_one_is_not(module):
    """Its lookup rescales the rows it reads in place: before, MAML failed in its backward with 'Output 0 of
    _Unflatten is a view and its base or another view of its base has been modified inplace'."""
    net = torch.nn.Sequential(module, torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=rf"module '0' \({type(module).__name__}\) has max_norm=1.0, and its weight "
                                         r"is adapted: .* build it with max_norm=None"):
        mk.MAML(net)
    with pytest.raises(ValueError, match="max_norm=1.0"):
        mk.LearnedOptimizerTrainer(mk.LearnedOptimizer(hidden=4), net)
    maml = mk.MAML(net, adapt=["1.weight", "1.bias"], inner_lr=0.5)  # ANIL: the table is meta-trained only
    ids = torch.randint(0, 10, (2, 3, 5))
    batch = (ids, torch.randint(0, 3, (2, 3)))
    with pytest.warns(RuntimeWarning, match="could not trace"):  # torch.vmap has no rule for the renorm: a loop
        maml(lambda f, b: torch.nn.functional.cross_entropy(f(b[0]) if isinstance(module, torch.nn.EmbeddingBag)
                                                            else f(b[0]).mean(1), b[1]), batch, batch).backward()
    assert module.weight.grad is not None


def test_maml_with_an_unadapted_sparse_embedding_gives_its_sparse_meta_gradient():
    """ANIL over a sparse embedding: the embedding is meta-trained only, and its gradient stays sparse
    (SparseAdam can take it), equal to the dense embedding's."""
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(10, 5, sparse=sparse), torch.nn.Flatten(1), torch.nn.Linear(35, 3))
        model.double()
        torch.manual_seed(1)
        x, y = torch.randint(0, 10, (4, 6, 7)), torch.randint(0, 3, (4, 6))
        loss_fn = lambda f, b: torch.nn.functional.cross_entropy(f(b[0]), b[1])  # noqa: E731
        mk.MAML(model, adapt=["2.weight", "2.bias"], inner_steps=2)(loss_fn, (x, y), (x, y)).backward()
        grads.append(model[0].weight.grad)
    assert grads[1].layout == torch.sparse_coo
    torch.testing.assert_close(grads[1].to_dense(), grads[0], rtol=1e-12, atol=1e-15)


def test_adapted_parameters_on_two_devices_are_refused():
    net = _Net()
    net.scale = torch.nn.Parameter(torch.tensor(1.5, device="meta"))
    with pytest.raises(ValueError, match=r"share one device .*'scale' has meta, 'lin.weight' has cpu"):
        ParamLayout(net)


def test_a_compiled_module_is_refused_with_the_module_it_wraps_as_advice():
    """torch 2.14 measured: second order through a compiled module fails ('does not currently support double
    backward', or a stride assertion under vmap)."""
    net = _Net()
    with pytest.raises(TypeError, match=r"the model is a torch.compile'd module.*\._orig_mod"):
        mk.MAML(torch.compile(net))
    outer = torch.nn.Sequential(torch.compile(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"module '0' is a torch.compile'd module"):
        ParamLayout(outer)
    assert ParamLayout(torch.compile(net)._orig_mod).names == ["scale", "lin.weight", "lin.bias", "emb.weight"]


def _classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _classification_tasks(classes=3):
    torch.manual_seed(1)
    batch = torch.randn(4, 6, 5), torch.randint(0, classes, (4, 6))
    return lambda f, b: torch.nn.functional.cross_entropy(f(b[0]), b[1]), batch


def test_a_model_whose_adapted_parameters_changed_shape_or_vanished_after_wrapping_is_refused():
    """Before: 'split_with_sizes expects split_sizes to sum exactly to 84' and KeyError('2.bias')."""
    loss_fn, batch = _classification_tasks(4)
    model = _classifier()
    maml, trainer = mk.MAML(model), mk.LearnedOptimizerTrainer(mk.LearnedOptimizer(hidden=4), model)
    model[2] = torch.nn.Linear(8, 4)
    message = r"model changed after it was wrapped: adapted parameter '2.weight' has shape \[4, 8\], \[3, 8\] when"
    with pytest.raises(RuntimeError, match=message):
        maml(loss_fn, batch, batch)
    with pytest.raises(RuntimeError, match=message):
        maml.adapt(loss_fn, batch)
    with pytest.raises(RuntimeError, match=message):
        trainer.unroll(loss_fn, batch, 1)
    model[2] = torch.nn.Linear(8, 3, bias=False)
    with pytest.raises(RuntimeError, match="no longer has the adapted parameter '2.bias'"):
        maml(loss_fn, batch, batch)


def test_a_model_cast_whole_after_wrapping_is_followed_and_one_cast_in_part_is_refused():
    loss_fn, batch = _classification_tasks()
    model = _classifier()
    maml = mk.MAML(model)
    model.double()
    assert maml(loss_fn, (batch[0].double(), batch[1]), (batch[0].double(), batch[1])).dtype == torch.float64
    model[2].float()
    with pytest.raises(ValueError, match=r"share one dtype .*'0.weight' has torch.float64, '2.weight' has torch.float32"):
        maml(loss_fn, batch, batch)


def test_a_head_replaced_by_one_of_the_same_shape_is_used():
    loss_fn, batch = _classification_tasks()
    model = _classifier()
    maml = mk.MAML(model)
    model[2] = torch.nn.Linear(8, 3)
    maml(loss_fn, batch, batch).backward()
    assert model[2].weight.grad is not None


def test_a_parameter_frozen_after_wrapping_still_adapts_and_gets_no_meta_gradient():
    """The README's rule (evaluation code that freezes the model before adapt keeps working)."""
    loss_fn, batch = _classification_tasks()
    model = _classifier()
    maml = mk.MAML(model, inner_lr=0.5)
    model[2].weight.requires_grad_(False)
    maml(loss_fn, batch, batch).backward()
    assert model[2].weight.grad is None and model[0].weight.grad is not None
    adapted = maml.adapt(loss_fn, batch).params(0)["2.weight"]
    assert not torch.allclose(adapted, model[2].weight)


class _TiedHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.mid = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 5)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.mid(self.embed(x)))


@pytest.mark.parametrize("adapt", [["head.weight", "head.bias"], ["embed.weight", "head.bias", "head.weight"],
                                   lambda name, p: name.startswith(("head", "embed"))], ids=["alias", "both", "predicate"])
def test_a_tied_parameter_is_selected_by_any_of_its_names(adapt):
    """model.named_parameters() names a tied tensor once (embed.weight); 'head.weight' names it too, and
    a list naming the head selects it (before: 'no parameter named head.weight')."""
    layout = ParamLayout(_TiedHead(), adapt)
    assert layout.names == ["embed.weight", "head.bias"]


@pytest.mark.parametrize("predicate,chosen,left", [
    (lambda name, p: name.startswith("head"), "['head.weight']", "['embed.weight']"),
    (lambda name, p: "embed" not in name, "['head.weight']", "['embed.weight']"),
])
def test_a_predicate_that_splits_a_tied_tensor_is_refused(predicate, chosen, left):
    """Before, the predicate saw only embed.weight: selecting the head adapted head.bias alone, and leaving
    out the embedding left out the head's weight, both without a word."""
    message = f"adapt: the predicate selects {chosen} but not {left}, which are one tied tensor"
    with pytest.raises(ValueError, match=re.escape(message)):
        ParamLayout(_TiedHead(), predicate)


def test_an_unknown_name_is_still_refused_next_to_an_alias():
    with pytest.raises(ValueError, match=r"adapt: no parameter named \['head.scale'\]"):
        ParamLayout(_TiedHead(), ["head.weight", "head.scale"])


def _lazy_model():
    return torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _meta_model():
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


_WRAPPERS = {
    "MAML": (lambda m: mk.MAML(m), "the model"),
    "MetaSGD": (lambda m: mk.MetaSGD(m), "the model"),
    "trainer": (lambda m: mk.LearnedOptimizerTrainer(mk.LearnedOptimizer(), m), "the model"),
    "compat.MAML.clone": (lambda m: compat.MAML(m, lr=0.1).clone(), "MAML.clone"),
    "compat.MetaSGD": (lambda m: compat.MetaSGD(m), "MetaSGD"),
}


@pytest.mark.parametrize("wrapper", list(_WRAPPERS))
def test_a_model_whose_parameters_hold_no_values_is_refused_with_what_to_do(wrapper):
    """Before: torch's "Can't access the shape of an uninitialized parameter" for a lazy module, and for a
    meta-device model "Tensor on device meta is not on the expected device cpu!" at the first call."""
    wrap, where = _WRAPPERS[wrapper]
    with pytest.raises(ValueError, match=re.escape(f"{where}: parameter '0.weight' is uninitialized (a lazy module "
                                                   "such as nn.LazyLinear sizes it at its first forward); run the "
                                                   "model once on an example batch before wrapping it")):
        wrap(_lazy_model())
    with pytest.raises(ValueError, match=re.escape(f"{where}: parameter '0.weight' is on the meta device and holds no "
                                                   "values; materialise the model first (model.to_empty(device=...), "
                                                   "then load or initialise its weights)")):
        wrap(_meta_model())
    model = _lazy_model()
    model(torch.randn(2, 3))  # once sized, the same model is taken
    wrap(model)


def test_a_model_moved_to_the_meta_device_after_wrapping_is_refused_at_the_call():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    maml = mk.MAML(model)
    model.to("meta")
    batch = (torch.randn(2, 5, 3), torch.randn(2, 5, 1))
    with pytest.raises(ValueError, match="parameter '0.weight' is on the meta device"):
        maml(lambda f, b: ((f(b[0]) - b[1]) ** 2).mean(), batch, batch)
