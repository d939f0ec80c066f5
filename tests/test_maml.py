"""MAML / FOMAML / Meta-SGD / subset adaptation against the sequential create_graph oracle, in float64,
on a causal transformer LM with LayerNorm, multi-head attention, token and position embeddings, GELU
and a vocabulary head."""
import re
import warnings

import pytest
import torch

import metakernels as mk
from conftest import ops_run
from maml_reference import sequential_meta_loss
from metakernels.models import TransformerLM, lm_loss

VOCAB, SEQ = 11, 7


def _model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return TransformerLM(vocab=VOCAB, d_model=16, n_heads=2, n_layers=2, max_len=8, dropout=dropout).double()


def _tasks(T, seed=1):
    gen = torch.Generator().manual_seed(seed)
    support = torch.randint(0, VOCAB, (T, 2, SEQ + 1), generator=gen)
    query = torch.randint(0, VOCAB, (T, 2, SEQ + 1), generator=gen)
    return support, query


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads_close(got, want, rtol=1e-9):
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0, i
            continue
        scale = w.abs().max().clamp_min(1e-12)
        assert (g - w).abs().max() <= rtol * scale + 1e-14, (i, (g - w).abs().max().item(), scale.item())


CASES = [
    dict(first_order=False, inner_optimizer="sgd"),
    dict(first_order=True, inner_optimizer="sgd"),
    dict(first_order=False, inner_optimizer="momentum"),
    dict(first_order=False, inner_optimizer="adam"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['inner_optimizer']}-{'fo' if c['first_order'] else 'so'}")
@pytest.mark.parametrize("T,K", [(1, 1), (3, 2), (2, 3)])
@pytest.mark.parametrize("memory,task_chunk", [("fast", None), ("fast", 2), ("low", 2)])
def test_maml_matches_sequential_reference(case, T, K, memory, task_chunk):
    model = _model()
    support, query = _tasks(T)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=K, memory=memory, task_chunk=task_chunk, **case)
    params = [p for p in model.parameters()]
    got_loss = maml(lm_loss, support, query)
    got = _grads(got_loss, params)
    names = [n for n, _ in model.named_parameters()]
    want_loss = sequential_meta_loss(model, lm_loss, support, query, names=names, lrs={n: 0.3 for n in names},
                                     steps=K, first_order=case["first_order"], optimizer=case["inner_optimizer"])
    want = _grads(want_loss, params)
    torch.testing.assert_close(got_loss.detach(), want_loss.detach(), rtol=1e-12, atol=1e-12)
    _assert_grads_close(got, want)


@pytest.mark.parametrize("learn_lr", ["parameter", "tensor", "scalar"])
def test_meta_sgd_gradients_of_init_and_rates(learn_lr):
    model = _model()
    support, query = _tasks(3)
    meta = mk.MetaSGD(model, inner_lr=0.2, inner_steps=2, learn_lr=learn_lr)
    with torch.no_grad():  # distinct rates, so that a mix-up of their order would show
        for i, r in enumerate(meta.inner_lrs):
            r.add_(0.01 * i + 0.001 * torch.arange(r.numel(), dtype=r.dtype).reshape(r.shape))
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    assert [r.shape for r in meta.inner_lrs] == (
        [p.shape for p in params] if learn_lr == "parameter" else [torch.Size([])] * (len(params) if learn_lr == "tensor" else 1)
    )
    rates = list(meta.inner_lrs)
    got = _grads(meta(lm_loss, support, query), params + rates)
    lrs = {n: (rates[i] if learn_lr != "scalar" else rates[0]) for i, n in enumerate(names)}
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=names, lrs=lrs, steps=2), params + rates)
    _assert_grads_close(got, want)
    assert all(g is not None for g in got[len(params):])


def test_subset_adaptation_anil_head_only():
    model = _model()
    support, query = _tasks(3)
    maml = mk.MAML(model, inner_lr=0.5, inner_steps=2, adapt=["head.weight", "head.bias"])
    params = list(model.parameters())
    got = _grads(maml(lm_loss, support, query), params)
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=["head.weight", "head.bias"],
                                       lrs={"head.weight": 0.5, "head.bias": 0.5}, steps=2), params)
    _assert_grads_close(got, want)
    assert all(g is not None for g in got)  # the shared body still gets meta-gradients


def test_predicate_and_frozen_parameters():
    model = _model()
    model.tok.weight.requires_grad_(False)
    maml = mk.MAML(model, adapt=lambda name, p: name.startswith("blocks.1"))
    assert all(n.startswith("blocks.1") for n in maml.layout.names)
    assert "tok.weight" not in mk.MAML(model).layout.names
    with pytest.raises(ValueError, match="requires_grad=False"):
        mk.MAML(model, adapt=["tok.weight"])
    with pytest.raises(ValueError, match="no parameter to adapt"):
        mk.MAML(model, adapt=lambda n, p: False)
    with pytest.raises(TypeError, match=r"got 'head.weight' \(one name: adapt=\['head.weight'\]\)"):
        mk.MAML(model, adapt="head.weight")
    with pytest.raises(TypeError, match="adapt must be None, a predicate .* or a list of parameter names, got 5"):
        mk.MAML(model, adapt=5)


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("loss_of", ["a parameter not adapted", "the data alone"])
def test_inner_loss_that_ignores_every_adapted_parameter_is_refused(inner_optimizer, loss_of):
    net = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 1), "unused": torch.nn.Linear(3, 1)})
    maml = mk.MAML(net, inner_lr=0.1, inner_steps=1, adapt=["unused.weight"], inner_optimizer=inner_optimizer)
    x = torch.randn(2, 4, 3)
    loss_fn = (lambda f, b: net["used"](b).pow(2).mean()) if loss_of == "a parameter not adapted" else (
        lambda f, b: b.pow(2).mean())
    with pytest.raises(ValueError, match="inner loss does not depend on any adapted parameter"):
        maml(loss_fn, x, x)


class _WithUnusedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = torch.nn.Linear(3, 1), torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("settings", [{}, {"task_chunk": 1}, {"memory": "low"}, {"first_order": True}])
def test_a_parameter_no_loss_uses_gets_zeros_adapted_and_none_shared(settings):
    net = _WithUnusedLayer().double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    loss_fn = lambda f, b: f(b).pow(2).mean()  # noqa: E731
    for adapt, expected in ((None, torch.zeros(2, 2, dtype=torch.float64)), (["used.weight", "used.bias"], None)):
        net.zero_grad(set_to_none=True)
        mk.MAML(net, inner_lr=0.1, inner_steps=2, adapt=adapt, **settings)(loss_fn, x, x).backward()
        assert net.used.weight.grad is not None
        if expected is None:
            assert net.unused.weight.grad is None
        else:
            assert torch.equal(net.unused.weight.grad, expected)


def test_meta_loss_matches_finite_differences_along_a_random_direction():
    model = _model()
    support, query = _tasks(2)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=2)
    params = list(model.parameters())
    grads = _grads(maml(lm_loss, support, query), params)
    gen = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))
    h = 1e-5
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, direction):
                p.add_(sign * h * d)
            with torch.enable_grad():
                values.append(maml(lm_loss, support, query).item())
            for p, d in zip(params, direction):
                p.sub_(sign * h * d)
    numeric = (values[0] - values[1]) / (2 * h)
    assert abs(numeric - analytic.item()) <= 1e-6 * max(1.0, abs(numeric))


def test_tied_weights_and_buffers():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 8)
            self.norm = torch.nn.BatchNorm1d(8, affine=False).eval()  # buffers only
            self.out = torch.nn.Linear(8, VOCAB, bias=False)
            self.out.weight = self.emb.weight  # tied

        def forward(self, tokens):
            h = self.emb(tokens)
            return self.out(self.norm(h.reshape(-1, 8)).reshape(h.shape))

    torch.manual_seed(0)
    model = Tied().double()
    support, query = _tasks(2)
    maml = mk.MAML(model, inner_lr=0.4, inner_steps=2)
    assert maml.layout.names == ["emb.weight"]
    params = list(model.parameters())
    got = _grads(maml(lm_loss, support, query), params)
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=["emb.weight"], lrs={"emb.weight": 0.4},
                                       steps=2), params)
    _assert_grads_close(got, want)


def test_dropout_second_order_sees_the_forward_masks():
    """With dropout, the meta-gradient equals the oracle's for the same masks (same seed, same order of
    forwards with vectorize=False): the second-order terms use the masks the forward drew."""
    model = _model(dropout=0.3)
    support, query = _tasks(2)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=1, vectorize=False)
    params = list(model.parameters())
    torch.manual_seed(123)
    got = _grads(maml(lm_loss, support, query), params)
    names = [n for n, _ in model.named_parameters()]
    torch.manual_seed(123)
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=names, lrs={n: 0.3 for n in names},
                                       steps=1), params)
    _assert_grads_close(got, want)


def test_adapt_returns_weights_and_callables():
    model = _model()
    support, query = _tasks(3)
    maml = mk.MAML(model, inner_lr=0.5, inner_steps=2)
    adapted = maml.adapt(lm_loss, support)
    assert adapted.fast.shape == (3, maml.layout.numel) and not adapted.fast.requires_grad
    before = adapted.losses(lm_loss, support)
    with torch.no_grad():
        plain = torch.stack([lm_loss(model, support[t]) for t in range(3)])
    assert (before < plain).all()  # adaptation lowered every task's support loss
    logits = adapted.task(1)(query[1, :, :-1])
    assert logits.shape == (2, SEQ, VOCAB)
    torch.testing.assert_close(lm_loss(adapted.task(1), query[1]), adapted.losses(lm_loss, query)[1])
    assert set(adapted.params(0)) == set(maml.layout.names)
    assert torch.equal(adapted.params(torch.tensor(2))["head.bias"], adapted.params(2)["head.bias"])
    for steps in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"steps must be an int >= 0, got {steps!r}"):
            maml.adapt(lm_loss, support, steps=steps)
    torch.testing.assert_close(maml.adapt(lm_loss, support, steps=0).fast, maml.layout.flatten().detach().expand(3, -1))
    for get in (adapted.params, adapted.task):  # the same checks for both (params(-1) was the last task)
        for bad, exc in ((-1, IndexError), (3, IndexError), (1.0, TypeError), (True, TypeError)):
            with pytest.raises(exc, match="out of range for 3 adapted tasks|task must be an int in \\[0, 3\\)"):
                get(bad)


@pytest.mark.parametrize("cls", [mk.MAML, mk.MetaSGD])
@pytest.mark.parametrize("settings", [{}, {"first_order": True}, {"task_chunk": 2}, {"memory": "low", "task_chunk": 1},
                                      {"inner_optimizer": "adam"}])
def test_meta_loss_under_no_grad_is_the_tracked_one_without_a_graph(cls, settings):
    support, query = _tasks(3)
    maml = cls(_model(), inner_lr=0.3, inner_steps=2, **settings)
    tracked = maml(lm_loss, support, query)
    with torch.no_grad():
        evaluated = maml(lm_loss, support, query)
    assert tracked.requires_grad and not evaluated.requires_grad
    torch.testing.assert_close(evaluated, tracked.detach(), rtol=1e-12, atol=0)


def test_inference_mode_is_refused_with_advice():
    support, query = _tasks(2)
    maml = mk.MAML(_model(), inner_lr=0.3, inner_steps=1)
    with torch.inference_mode():
        for name, call in (("MAML.forward", lambda: maml(lm_loss, support, query)),
                           ("MAML.adapt", lambda: maml.adapt(lm_loss, support))):
            with pytest.raises(RuntimeError, match=f"{name}: the inner steps take gradients, which "
                                                   r"torch.inference_mode\(\) forbids; use torch.no_grad\(\)"):
                call()


@pytest.mark.parametrize("bad,exc,words", [
    ("t_mismatch", ValueError, ["support has T=3", "query has T=2"]),
    ("no_tasks", ValueError, ["support has shape [0, 2, 8]: no tasks"]),
    ("no_task_dim", ValueError, ["0-d"]),
    ("non_scalar", ValueError, ["scalar", "[2]"]),
    ("not_tensor", TypeError, ["scalar tensor", "float"]),
])
def test_bad_input_is_explained(bad, exc, words):
    model = _model()
    support, query = _tasks(3)
    loss_fn = lm_loss
    if bad == "t_mismatch":
        query = query[:2]
    elif bad == "no_tasks":
        support, query = support[:0], query[:0]
    elif bad == "no_task_dim":
        support = (support, torch.tensor(1.0))
    elif bad == "non_scalar":
        loss_fn = lambda f, b: torch.stack([lm_loss(f, b), lm_loss(f, b)])  # noqa: E731
    elif bad == "not_tensor":
        loss_fn = lambda f, b: 1.0  # noqa: E731
    with pytest.raises(exc) as info:
        mk.MAML(model, vectorize=False)(loss_fn, support, query)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("kwargs,exc,message", [
    ({"inner_steps": -1}, ValueError, "inner_steps must be an int >= 0, got -1"),
    ({"inner_steps": 1.5}, ValueError, "inner_steps must be an int >= 0, got 1.5"),
    ({"memory": "tiny"}, ValueError, "memory must be one of ('fast', 'low'), got 'tiny'"),
    ({"task_chunk": 0}, ValueError, "task_chunk must be an int >= 1 or None, got 0"),
    ({"nan_policy": "warn"}, ValueError, "nan_policy must be one of"),
    ({"inner_optimizer": "rmsprop"}, ValueError, "inner_optimizer must be one of ('sgd', 'momentum', 'adam')"),
    ({"inner_optimizer": "adam", "betas": (0.9, 0.99, 0.9)}, ValueError, "betas must be a pair"),
    ({"inner_optimizer": "adam", "betas": (0.9, 1.5)}, ValueError, "argument 'beta2' must be in [0.0, 1.0), got 1.5"),
    ({"inner_optimizer": "adam", "eps": -1e-8}, ValueError, "argument 'eps' must be in [0.0, inf], got -1e-08"),
    ({"inner_optimizer": "momentum", "momentum": float("nan")}, ValueError, "argument 'momentum' must be finite"),
    ({"inner_lr": -0.1}, ValueError, "argument 'inner_lr' must be in [0.0, inf], got -0.1"),
    ({"inner_lr": float("inf")}, ValueError, "argument 'inner_lr' must be finite, got inf"),
    ({"inner_lr": "0.1"}, TypeError, "argument 'inner_lr' must be a real number, got str"),
    ({"inner_lr": torch.tensor([0.1, 0.2])}, ValueError, "argument 'inner_lr' must be a number or a tensor [], ["),
    ({"inner_lr": torch.tensor([1, 2])}, TypeError, "argument 'inner_lr' must be a floating-point tensor, got dtype torch.int64"),
    ({"inner_lr": torch.tensor(float("nan"))}, ValueError, "argument 'inner_lr' must hold finite rates >= 0"),
    ({"inner_lr": -0.1, "learn_lr": "scalar"}, ValueError, "argument 'inner_lr' must be in [0.0, inf], got -0.1"),
    ({"model": "not a module"}, TypeError, "model must be an nn.Module, got str"),
    ({"learn_lr": "row"}, ValueError, "learn_lr must be one of ('parameter', 'tensor', 'scalar'), got 'row'"),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_bad_settings_are_refused_when_constructed(kwargs, exc, message):
    """Each setting of MAML / MetaSGD is checked at construction, naming the setting and the value."""
    kwargs = {"model": _model(), **kwargs}
    cls = mk.MetaSGD if "learn_lr" in kwargs else mk.MAML
    with pytest.raises(exc, match=re.escape(message)):
        cls(kwargs.pop("model"), **kwargs)


@pytest.mark.parametrize("shape", ["scalar", "per_parameter", "per_task"])
def test_a_tensor_inner_lr_of_every_accepted_shape_equals_the_number(shape):
    """inner_lr as a 0-d, [P] or [T, P] tensor of one value gives the number's meta-loss and meta-gradient
    (the construction check accepts the shapes the update ops take; the number runs the seeded-SGD path)."""
    support, query = _tasks(3)
    model = _model()
    want = mk.MAML(model, inner_lr=0.3, inner_steps=2)(lm_loss, support, query)
    want_grads = _grads(want, list(model.parameters()))
    P = sum(p.numel() for p in model.parameters())
    rate = torch.tensor(0.3, dtype=torch.float64).expand({"scalar": (), "per_parameter": (P,), "per_task": (3, P)}[shape])
    got = mk.MAML(model, inner_lr=rate, inner_steps=2)(lm_loss, support, query)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    _assert_grads_close(_grads(got, list(model.parameters())), want_grads)


class _ScaleByDataSign(torch.nn.Module):
    """A model vmap cannot trace: a Python branch on the value of its input."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t):
        logits = self.inner(t)
        return logits * 2 if bool(t.sum() % 2) else logits


def test_a_model_vmap_cannot_trace_falls_back_to_the_loop_once_with_a_warning():
    support, query = _tasks(3)
    reference = _ScaleByDataSign(_model())
    want = _grads(mk.MAML(reference, inner_lr=0.3, inner_steps=2, vectorize=False)(lm_loss, support, query),
                  list(reference.parameters()))
    model = _ScaleByDataSign(_model())
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=2)
    with pytest.warns(RuntimeWarning, match="torch.vmap could not trace this model .*in a loop instead"):
        got = _grads(maml(lm_loss, support, query), list(model.parameters()))
    _assert_grads_close(got, want)
    assert maml._evaluator.vectorize is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maml(lm_loss, support, query)  # no second warning: the loop is remembered
    with pytest.raises(RuntimeError):
        mk.MAML(_ScaleByDataSign(_model()), vectorize=True)(lm_loss, support, query)


def test_an_error_of_the_loss_fn_is_raised_as_itself_not_as_vmap_s():
    """The loss_fn's own error raises again in the loop: no warning that blames vmap, vmap stays on."""
    support, query = _tasks(3)

    def broken(f, batch):
        raise RuntimeError("the tokenizer is missing")

    maml = mk.MAML(_model(), inner_lr=0.3, inner_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="the tokenizer is missing"):
            maml(broken, support, query)
    assert maml._evaluator.vectorize is None
    maml(lm_loss, support, query)


def _elements_written_by_backward(T: int) -> int:
    """Elements of all tensors the meta-backward of a first-order, one-step MAML in the task loop creates."""
    model = _model()
    support, query = _tasks(T)
    loss = mk.MAML(model, inner_lr=0.3, inner_steps=1, first_order=True, vectorize=False)(lm_loss, support, query)
    _, ran = ops_run(loss.backward)
    return sum(o.numel() for _, _, outputs in ran for o in outputs)


def test_the_task_loop_backward_grows_linearly_with_the_tasks():
    """The loop hands each task views of the [T, ...] weights whose backward writes each cotangent once (not
    a zero-filled [T, ...] tensor per task and parameter, summed T times: quadratic in T)."""
    ratio = _elements_written_by_backward(16) / _elements_written_by_backward(4)
    assert ratio < 4.5, f"16 tasks write {ratio:.1f}x what 4 tasks write: more than linear"


def weighted_lm_loss(f, batch):
    """lm_loss times a per-task weight: batches (tokens, weight), so that a test can make one task's loss
    non-finite."""
    tokens, weight = batch
    return lm_loss(f, tokens) * weight


def test_non_finite_inner_loss_names_task_and_step():
    model = _model()
    tokens_s, tokens_q = _tasks(3)
    scale = torch.ones(3, dtype=torch.float64)
    scale[1] = float("nan")
    support, query = (tokens_s, scale), (tokens_q, torch.ones(3, dtype=torch.float64))
    with pytest.raises(FloatingPointError, match="task 1 at inner step 1"):
        mk.MAML(model, inner_lr=0.1)(weighted_lm_loss, support, query)
    ignored = mk.MAML(model, inner_lr=0.1, nan_policy="ignore")(weighted_lm_loss, support, query)
    assert torch.isnan(ignored)


def test_layer_without_double_backward_is_reported():
    class OnceDifferentiable(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.tanh()

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - x.tanh() ** 2)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 4)
            self.out = torch.nn.Linear(4, VOCAB)

        def forward(self, t):
            return self.out(OnceDifferentiable.apply(self.emb(t)))

    support, query = _tasks(2)
    with pytest.raises(RuntimeError, match="first_order=True"):
        mk.MAML(Net().double(), vectorize=False)(lm_loss, support, query)
    mk.MAML(Net().double(), first_order=True, vectorize=False)(lm_loss, support, query).backward()


@pytest.mark.parametrize("vectorize", [None, False], ids=["vmap", "loop"])
def test_an_adapted_embedding_bag_is_reported_before_the_backward(vectorize):
    """torch has no second derivative for EmbeddingBag's backward; before, the forward ran and .backward()
    failed with "the derivative for '_embedding_bag_backward' is not implemented"."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(VOCAB, 4), torch.nn.Linear(4, 3)).double()
    batch = (torch.randint(0, VOCAB, (2, 3, 5)), torch.randint(0, 3, (2, 3)))
    loss_fn = lambda f, b: torch.nn.functional.cross_entropy(f(b[0]), b[1])  # noqa: E731
    with pytest.raises(RuntimeError, match=r"no double backward \(autograd node EmbeddingBagBackwardBackward0.*"
                                           r"first_order=True"):
        mk.MAML(model, vectorize=vectorize)(loss_fn, batch, batch)
    mk.MAML(model, first_order=True, vectorize=vectorize)(loss_fn, batch, batch).backward()
    mk.MAML(model, adapt=["1.weight", "1.bias"], vectorize=vectorize)(loss_fn, batch, batch).backward()  # ANIL


def _tiny_gpt2(attn_implementation):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (.ci/setup installs it)")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double()


def _hf_loss(f, batch):
    return f(input_ids=batch, labels=batch).loss


def _float64_logits_loss(f, batch):
    logits = f(input_ids=batch).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@pytest.mark.parametrize("loss_fn,rtol", [(_hf_loss, 1e-6), (_float64_logits_loss, 1e-9)], ids=["hf-loss", "float64-loss"])
def test_hugging_face_gpt2_second_order_matches_reference(loss_fn, rtol):
    """A real transformers GPT-2 (tied embeddings, Conv1D layers) built from a tiny config, with its own
    loss (``labels=``), which casts the logits to float32 (so the two sides agree to float32 rounding
    only: they round the differently scaled gradients of plain SGD's seed differently), and with a
    float64 loss on its logits."""
    model = _tiny_gpt2("eager")
    support, query = _tasks(2)

    maml = mk.MAML(model, inner_lr=0.3, inner_steps=2)
    params = list(model.parameters())
    got = _grads(maml(loss_fn, support, query), params)
    names = [n for n, _ in model.named_parameters()]
    want = _grads(sequential_meta_loss(model, loss_fn, support, query, names=names, lrs={n: 0.3 for n in names},
                                       steps=2), params)
    _assert_grads_close(got, want, rtol)


@pytest.mark.parametrize("mode", [dict(), dict(memory="low"), dict(vectorize=False)], ids=["fast", "low", "loop"])
def test_hugging_face_sdpa_attention_second_order_matches_the_eager_reference(mode):
    """Hugging Face's default attention calls torch's SDPA, whose fused kernels have no double backward
    (before: refused with advice to use attn_implementation='eager'); second order runs it on SDPA's
    math backend, which gives the eager attention model's meta-gradient."""
    model, reference = _tiny_gpt2("sdpa"), _tiny_gpt2("eager")
    support, query = _tasks(2)
    got = _grads(mk.MAML(model, inner_lr=0.3, inner_steps=2, **mode)(_float64_logits_loss, support, query),
                 list(model.parameters()))
    names = [n for n, _ in reference.named_parameters()]
    want = _grads(sequential_meta_loss(reference, _float64_logits_loss, support, query, names=names,
                                       lrs={n: 0.3 for n in names}, steps=2), list(reference.parameters()))
    _assert_grads_close(got, want, 1e-9)


def test_meta_gradient_is_bit_identical_across_runs():
    support, query = _tasks(4)
    runs = []
    for _ in range(2):
        model = _model(dropout=0.1)
        torch.manual_seed(7)
        runs.append(_grads(mk.MAML(model, inner_lr=0.3, inner_steps=2)(lm_loss, support, query), list(model.parameters())))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype,autocast,seed_carries_rate", [
    (torch.float64, False, True), (torch.float32, False, True), (torch.float32, True, False), (torch.float16, False, False),
])
def test_plain_sgd_puts_the_rate_on_the_backward_seed_only_where_it_cannot_underflow(monkeypatch, dtype, autocast,
                                                                                    seed_carries_rate):
    from metakernels import ops
    from metakernels.inner_loop import InnerOptimizer

    calls = []
    fused = ops.sgd_update
    monkeypatch.setattr(ops, "sgd_update", lambda *a: calls.append(1) or fused(*a))
    from metakernels.layout import ParamLayout

    params = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(params.clone())
    layout = ParamLayout(module)
    views, _ = layout.unflatten_for_update(params.expand(2, -1).detach().requires_grad_(), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = (views["w"] * views["w"]).sum(-1) * torch.tensor([1.0, 3.0], dtype=dtype)
        new, state = InnerOptimizer("sgd").descend(params, views, losses, (), 0.1, 1, layout)
    assert bool(calls) != seed_carries_rate and state == ()
    exact = params.double() * (1 - 0.1 * 2 * torch.tensor([[1.0], [3.0]], dtype=torch.float64))
    torch.testing.assert_close(new.double(), exact, rtol=2e-3 if dtype == torch.float16 else 1e-6, atol=0)
