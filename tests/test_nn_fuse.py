"""metakernels.nn: fuse_layers swaps the fused layers into a model without changing its parameters or
outputs, and MAML / Meta-SGD with fused layers give the meta-gradients of the sequential create_graph
oracle (float64, 1e-9 relative) on the transformer LM with LayerNorm, attention, embeddings and GELU."""
import copy

import pytest
import torch
from torch import nn

import metakernels as mk
from maml_reference import sequential_meta_loss
from metakernels.models import lm_loss
from test_maml import CASES, _assert_grads_close, _float64_logits_loss, _grads, _model, _tasks, _tiny_gpt2


def test_fuse_layers_lists_every_change_and_keeps_parameters_and_outputs():
    model = _model()
    tokens = torch.randint(0, 11, (3, 7))
    before = model(tokens)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    changes = mk.nn.fuse_layers(model)
    assert changes == [
        "blocks.0.ln1: torch.nn.LayerNorm -> metakernels.nn.LayerNorm",
        "blocks.0.attn: metakernels.models.CausalSelfAttention -> metakernels.nn.CausalSelfAttention",
        "blocks.0.ln2: torch.nn.LayerNorm -> metakernels.nn.LayerNorm",
        "blocks.0.mlp.0 + blocks.0.mlp.1: torch.nn.Linear + torch.nn.GELU -> metakernels.nn.LinearGELU + torch.nn.Identity",
        "blocks.1.ln1: torch.nn.LayerNorm -> metakernels.nn.LayerNorm",
        "blocks.1.attn: metakernels.models.CausalSelfAttention -> metakernels.nn.CausalSelfAttention",
        "blocks.1.ln2: torch.nn.LayerNorm -> metakernels.nn.LayerNorm",
        "blocks.1.mlp.0 + blocks.1.mlp.1: torch.nn.Linear + torch.nn.GELU -> metakernels.nn.LinearGELU + torch.nn.Identity",
        "ln_f: torch.nn.LayerNorm -> metakernels.nn.LayerNorm",
    ]
    assert isinstance(model.blocks[0].ln1, mk.nn.LayerNorm) and isinstance(model.blocks[0].mlp[1], nn.Identity)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    torch.testing.assert_close(model(tokens), before, rtol=1e-13, atol=1e-13)
    assert mk.nn.fuse_layers(model) == []  # idempotent


def test_fuse_layers_rmsnorm_standalone_gelu_and_what_it_keeps():
    model = nn.Sequential(nn.RMSNorm(6), nn.Linear(6, 6), nn.Tanh(), nn.GELU(approximate="tanh"),
                          nn.LayerNorm((2, 3)), nn.Flatten(0, 1)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    before = model[:4](x)
    changes = mk.nn.fuse_layers(model)
    assert changes == [
        "0: torch.nn.RMSNorm -> metakernels.nn.RMSNorm",
        "3: torch.nn.GELU -> metakernels.nn.GELU",
        "4: LayerNorm kept (normalizes 2 trailing dimensions; the fused op normalizes the last one)",
    ]
    torch.testing.assert_close(model[:4](x), before, rtol=1e-13, atol=1e-13)


def test_fuse_layers_folds_only_a_linear_used_once_and_the_slot_right_after_it():
    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64)
    shared, tanh = nn.Linear(4, 4), nn.Tanh()
    models = [
        nn.Sequential(shared, nn.GELU(), shared),       # one Linear in two slots: must not get the GELU
        nn.Sequential(tanh, nn.Linear(4, 4), tanh, nn.GELU()),  # the GELU follows the Tanh's second slot
    ]
    expected = [
        ["0: Linear kept (the model holds it in 2 places; folding the GELU after it into it would apply the "
         "GELU at every one)", "1: torch.nn.GELU -> metakernels.nn.GELU"],
        ["3: torch.nn.GELU -> metakernels.nn.GELU"],
    ]
    for model, changes in zip(models, expected):
        model.double()
        before = model(x)
        assert mk.nn.fuse_layers(model) == changes
        torch.testing.assert_close(model(x), before, rtol=1e-13, atol=1e-13)
        assert not any(isinstance(m, mk.nn.LinearGELU) for m in model.modules())


@pytest.mark.parametrize("hooked", ["linear-forward", "gelu-forward", "gelu-pre", "linear-backward", "global-forward"])
def test_fuse_layers_does_not_fold_a_linear_and_gelu_that_hooks_watch(hooked):
    """A hook on the Linear would see the GELU's output once folded, and one on the GELU would no longer
    run: the pair is kept (the GELU still becomes the fused GELU, keeping its hooks), and every hook sees
    the values it saw before the swap."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    seen = []
    record = lambda *args: seen.append([a.detach().clone() for a in args if isinstance(a, torch.Tensor)])
    record_output = lambda module, inputs, output: record(output)
    register = {
        "linear-forward": lambda: model[0].register_forward_hook(record_output),
        "gelu-forward": lambda: model[1].register_forward_hook(record_output),
        "gelu-pre": lambda: model[1].register_forward_pre_hook(lambda module, inputs: record(*inputs)),
        "linear-backward": lambda: model[0].register_full_backward_hook(lambda module, gi, go: record(*go)),
        "global-forward": lambda: nn.modules.module.register_module_forward_hook(
            lambda module, inputs, output: record(output) if isinstance(module, nn.Linear) else None),
    }[hooked]()
    try:
        model(x).sum().backward()
        before, seen[:] = list(seen), []
        changes = mk.nn.fuse_layers(model)
        model(x).sum().backward()
    finally:
        register.remove()
    where = {"linear-forward": "0", "gelu-forward": "1", "gelu-pre": "1", "linear-backward": "0",
             "global-forward": "every module (a global hook)"}[hooked]
    assert changes == [f"0: Linear kept (hooks on {where}; folding the GELU after it into it would change the "
                       "Linear's output they see and drop the GELU's own)", "1: torch.nn.GELU -> metakernels.nn.GELU"]
    assert type(model[1]) is mk.nn.GELU
    assert len(seen) == len(before) > 0
    for got, want in zip(seen, before):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)


def test_fuse_layers_refuses_a_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        mk.nn.fuse_layers(lambda x: x)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['inner_optimizer']}-{'fo' if c['first_order'] else 'so'}")
@pytest.mark.parametrize("T,K", [(1, 1), (3, 2), (2, 3)])
@pytest.mark.parametrize("memory,task_chunk", [("fast", None), ("fast", 2), ("low", 2)])
def test_maml_with_fused_layers_matches_sequential_reference(case, T, K, memory, task_chunk):
    reference_model = _model()
    model = copy.deepcopy(reference_model)
    support, query = _tasks(T)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=K, memory=memory, task_chunk=task_chunk, fused_layers=True, **case)
    assert len(maml.fused_layers) == 9
    got_loss = maml(lm_loss, support, query)
    got = _grads(got_loss, list(model.parameters()))
    names = [n for n, _ in reference_model.named_parameters()]
    want_loss = sequential_meta_loss(reference_model, lm_loss, support, query, names=names,
                                     lrs={n: 0.3 for n in names}, steps=K, first_order=case["first_order"],
                                     optimizer=case["inner_optimizer"])
    want = _grads(want_loss, list(reference_model.parameters()))
    torch.testing.assert_close(got_loss.detach(), want_loss.detach(), rtol=1e-12, atol=1e-12)
    _assert_grads_close(got, want)


@pytest.mark.parametrize("vectorize", [True, False], ids=["vmap", "loop"])
def test_meta_sgd_with_fused_layers_equals_unfused(vectorize):
    support, query = _tasks(3)
    grads = []
    for fused in (False, True):
        model = _model()
        meta = mk.MetaSGD(model, inner_lr=0.2, inner_steps=2, fused_layers=fused, vectorize=vectorize)
        grads.append(_grads(meta(lm_loss, support, query), list(meta.parameters())))
    _assert_grads_close(grads[1], grads[0])


def test_hugging_face_gpt2_with_fused_layernorms_matches_reference():
    reference_model = _tiny_gpt2("eager")
    model = copy.deepcopy(reference_model)
    support, query = _tasks(2)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=2, fused_layers=True)
    assert sum("LayerNorm -> metakernels.nn.LayerNorm" in c for c in maml.fused_layers) == 5
    got = _grads(maml(_float64_logits_loss, support, query), list(model.parameters()))
    names = [n for n, _ in reference_model.named_parameters()]
    want = _grads(sequential_meta_loss(reference_model, _float64_logits_loss, support, query, names=names,
                                       lrs={n: 0.3 for n in names}, steps=2), list(reference_model.parameters()))
    _assert_grads_close(got, want)
