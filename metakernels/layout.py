"""Which parameters of a model adapt in the inner loop, and their flat [P] layout.

The adapted parameters are concatenated (model order) into one vector of P elements, so that the
fused update ops run on [T, P] fast weights; ``unflatten`` gives per-parameter views back."""
from __future__ import annotations

import sys
from typing import Callable, Iterable

import torch
from torch import nn

from ._autograd import cached_signature
from .saved_views import storage_held_only_by

AdaptSpec = None | Callable[[str, nn.Parameter], bool] | Iterable[str]


def refuse_parameters_without_data(named: list[tuple[str, nn.Parameter]], where: str) -> None:
    """A clear error for a parameter that holds no values yet: a lazy module's (nn.LazyLinear) before its
    first forward, or one on the meta device (a model built under torch.device("meta"))."""
    for name, p in named:
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(f"{where}: parameter {name!r} is uninitialized (a lazy module such as nn.LazyLinear "
                             "sizes it at its first forward); run the model once on an example batch before "
                             "wrapping it")
        if p.is_meta:
            raise ValueError(f"{where}: parameter {name!r} is on the meta device and holds no values; materialise "
                             "the model first (model.to_empty(device=...), then load or initialise its weights)")


def _check_one_float_layout(chosen: list[tuple[str, nn.Parameter]]) -> None:
    """The adapted parameters become one [T, P] tensor: they must share a floating dtype and a device
    (torch.cat would silently promote a float32 model's weights to the dtype of one float64 parameter), and
    hold values."""
    not_float = [(n, p.dtype) for n, p in chosen if not p.dtype.is_floating_point]
    if not_float:
        name, dtype = not_float[0]
        raise TypeError(f"adapted parameter {name!r} has dtype {dtype}; adapted parameters must be real floating point "
                        "(leave it out of 'adapt' or freeze it)")
    for attribute in ("dtype", "device"):
        first_name, first = chosen[0]
        for name, p in chosen[1:]:
            if getattr(p, attribute) != getattr(first, attribute):
                raise ValueError(
                    f"adapted parameters must share one {attribute} (they are packed into one [T, P] tensor): "
                    f"{first_name!r} has {getattr(first, attribute)}, {name!r} has {getattr(p, attribute)}; "
                    f"move the model with .to(...) or leave one of them out of 'adapt'")
    refuse_parameters_without_data(chosen, "the model")


def _refuse_unadaptable_embeddings(model: nn.Module, chosen: list[tuple[str, nn.Parameter]]) -> None:
    """Embeddings whose weight cannot adapt: with sparse=True its gradient is sparse, which cannot be taken
    through the dense per-task fast weights (torch fails with 'reshape is not implemented for sparse
    tensors'); with max_norm its lookup renormalises the rows it reads in place, which would overwrite the
    fast weights that the inner steps' graph holds (torch fails with 'a view ... has been modified
    inplace')."""
    adapted = {id(p) for _, p in chosen}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or id(module.weight) not in adapted:
            continue
        where = f"module {name or 'the model'!r} ({type(module).__name__})"
        if module.sparse:
            raise ValueError(f"{where} has sparse=True, and its weight is adapted: its gradient would be sparse, which "
                             "the dense per-task fast weights cannot take; build it with sparse=False or leave its "
                             "weight out of 'adapt'")
        if module.max_norm is not None:
            raise ValueError(f"{where} has max_norm={module.max_norm}, and its weight is adapted: its lookup rescales "
                             "the rows it reads in place, which would overwrite the per-task fast weights the inner "
                             "steps differentiate; build it with max_norm=None (renormalise the rows in the loss or "
                             "after the meta-step instead) or leave its weight out of 'adapt'")


def _refuse_compiled_modules(model: nn.Module) -> None:
    """A torch.compile'd module cannot run with per-task fast weights: its compiled backward has no double
    backward (second order), and under torch.vmap or a second call with other weights it failed inside the
    compiled code (torch 2.14: a stride assertion, or 'donated buffers' needing create_graph=False)."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled (and importing dynamo takes a second)
        return
    for name, module in model.named_modules():
        if isinstance(module, sys.modules["torch._dynamo"].eval_frame.OptimizedModule):
            where = f"module {name!r}" if name else "the model"
            raise TypeError(f"{where} is a torch.compile'd module, which metakernels cannot run with per-task fast "
                            "weights (under torch.vmap its compiled backward fails) or differentiate twice (no double "
                            "backward); pass the module it wraps (its ._orig_mod), and for speed swap in "
                            "metakernels' fused layers (mk.nn.fuse_layers)")


def _tied_verdict(adapt, names: list[str], param: nn.Parameter) -> bool:
    """The predicate's answer for a parameter known by ``names`` (more than one where it is tied); answers
    that differ are refused, since adapting one name adapts the one tensor under all of them."""
    verdicts = {name: bool(adapt(name, param)) for name in names}
    if len(set(verdicts.values())) > 1:
        chosen = [n for n, v in verdicts.items() if v]
        left = [n for n, v in verdicts.items() if not v]
        raise ValueError(f"adapt: the predicate selects {chosen} but not {left}, which are one tied tensor; adapting "
                         "it under one name adapts it under all, so make the predicate give its names one answer")
    return verdicts[names[0]]


class ParamLayout:
    def __init__(self, model: nn.Module, adapt: AdaptSpec = None):
        named = list(model.named_parameters())
        trainable = [(n, p) for n, p in named if p.requires_grad]
        # a tied parameter has one name here and more in the model (head.weight for embed.weight): a list
        # selects it by any of them; a predicate must give all of them one answer
        aliases = {}
        for alias, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(alias)
        if adapt is None:
            chosen = trainable
        elif callable(adapt):
            chosen = [(n, p) for n, p in trainable if _tied_verdict(adapt, aliases[id(p)], p)]
        else:
            if isinstance(adapt, str) or not isinstance(adapt, Iterable):
                raise TypeError(f"adapt must be None, a predicate (name, param) -> bool or a list of parameter names, "
                                f"got {adapt!r}" + (f" (one name: adapt=[{adapt!r}])" if isinstance(adapt, str) else ""))
            canonical = {alias: n for n, p in named for alias in aliases[id(p)]}
            wanted = [canonical.get(n, n) for n in adapt]
            known = {n for n, _ in named}
            unknown = [n for n in wanted if n not in known]
            if unknown:
                raise ValueError(f"adapt: no parameter named {unknown[:5]} in the model (it has e.g. {sorted(known)[:5]})")
            frozen = [n for n in wanted if not dict(named)[n].requires_grad]
            if frozen:
                raise ValueError(f"adapt: parameters {frozen[:5]} have requires_grad=False and never adapt")
            wanted_set = set(wanted)
            chosen = [(n, p) for n, p in trainable if n in wanted_set]
        if not chosen:
            raise ValueError(
                "the model has no parameter to adapt: every parameter is frozen or excluded by 'adapt'; "
                "give a predicate or list of names that selects at least one trainable parameter"
            )
        _refuse_compiled_modules(model)
        _check_one_float_layout(chosen)
        _refuse_unadaptable_embeddings(model, chosen)
        self.names = [n for n, _ in chosen]
        self.shapes = [p.shape for _, p in chosen]
        self.numels = [p.numel() for _, p in chosen]
        self.numel = sum(self.numels)
        self._module = model
        self._spec = (tuple(self.numels), tuple(self.shapes))

    def parameters(self) -> list[nn.Parameter]:
        """The adapted parameters, fetched by name (so that a module moved with .to() is followed);
        raises if the model no longer has them with the shapes, one dtype and one device the layout was
        built for (a head swapped for another size after MAML was built)."""
        params = dict(self._module.named_parameters())
        for name, shape in zip(self.names, self.shapes):
            if name not in params:
                raise RuntimeError(f"the model changed after it was wrapped: it no longer has the adapted parameter "
                                   f"{name!r}; wrap the changed model anew (the [T, P] layout is fixed when built)")
            if params[name].shape != shape:
                raise RuntimeError(f"the model changed after it was wrapped: adapted parameter {name!r} has shape "
                                   f"{list(params[name].shape)}, {list(shape)} when wrapped; wrap the changed model "
                                   "anew (the [T, P] layout is fixed when built)")
        chosen = [(n, params[n]) for n in self.names]
        _check_one_float_layout(chosen)
        return [p for _, p in chosen]

    def flatten(self, values: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The adapted parameters (or ``values``, by name, in their place) as one differentiable [P]
        vector."""
        tensors = self.parameters() if values is None else [values[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., P] -> {name: [..., *shape]} views.  Differentiable to any order; the backward writes each
        parameter's cotangent, whatever its strides, straight into one [..., P] tensor (a reshape to
        [..., numel] and a cat would copy the transposed cotangents of linear layers twice)."""
        return dict(zip(self.names, _Unflatten.apply(flat, self._spec, False)))

    def unflatten_for_update(self, params: torch.Tensor, T: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(the [T, *shape] views of ``params`` [T, P], or of [P] expanded to T rows; the tensor an inner
        update of ``params`` should start from).  For [T, P] params that is ``params`` itself as an output
        of the views' node, so that in the backward the update's cotangent and the views' reach one node,
        which adds the views' into it in one pass instead of autograd packing them into a new [T, P]
        tensor and adding the two.  [P] params are returned as they are: their update sums its cotangent
        over the tasks."""
        if params.dim() == 1:
            return self.unflatten(params.expand(T, -1)), params
        *views, same = _Unflatten.apply(params, self._spec, True)
        return dict(zip(self.names, views)), same

    def pack(self, parts, onto: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
        """``onto`` ([..., P], or [P] broadcast over the parts' leading dimensions) plus the per-parameter
        tensors ``parts`` [..., *shape] (model order, None: zeros) in the flat layout, in one pass;
        ``onto=None`` packs onto zeros (a [..., P] copy of the parts).

        in_place: write the result into ``onto``'s memory (contiguous, of the result's shape) and return
        a new tensor on it, unknown to autograd as an alias.  Only for an ``onto`` whose values nothing
        reads again: no backward needs them (the backward of this op does not), and no other tensor
        holds its storage (see :func:`metakernels.saved_views.storage_held_only_by`)."""
        if in_place and (onto is None or not onto.is_contiguous() or onto.shape[:-1] != _lead(parts, self._spec)):
            raise ValueError("pack(in_place=True) needs a contiguous onto of the result's shape")
        return _Pack.apply(onto, self._spec, in_place, *parts)


def _views(flat: torch.Tensor, spec) -> tuple[torch.Tensor, ...]:
    numels, shapes = spec
    lead = flat.shape[:-1]
    return tuple(chunk.view((*lead, *s)) for s, chunk in zip(shapes, flat.split(numels, dim=-1)))


def _lead(parts, spec):
    """The leading (task) dimensions of the first present part; None when all are None."""
    for part, shape in zip(parts, spec[1]):
        if part is not None:
            return part.shape[:part.dim() - len(shape)]
    return None


@cached_signature
class _Unflatten(torch.autograd.Function):
    """flat [..., P] -> views [..., *shape_i] (and flat itself with keep_flat); backward: _Pack."""

    @staticmethod
    def forward(ctx, flat, spec, keep_flat):
        ctx.set_materialize_grads(False)
        ctx.spec, ctx.keep_flat = spec, keep_flat
        views = _views(flat, spec)
        return (*views, flat.view_as(flat)) if keep_flat else views

    @staticmethod
    def backward(ctx, *grads):
        parts, onto = (grads[:-1], grads[-1]) if ctx.keep_flat else (grads, None)
        if all(g is None for g in parts):
            return onto, None, None
        # Packs into flat's cotangent when nothing else holds it (an inner step's [T, P] cotangent in the
        # meta-backward): one [T, P] less at the pass's peak.
        in_place = (onto is not None and onto.is_contiguous()
                    and onto.shape[:-1] == _lead(parts, ctx.spec) and storage_held_only_by(onto, 1))
        return _Pack.apply(onto, ctx.spec, in_place, *parts), None, None


@cached_signature
class _Pack(torch.autograd.Function):
    """onto [..., P] or [P] (broadcast over the parts' leading dimensions; None: zeros) plus per-parameter
    tensors [..., *shape_i] (None: zeros) placed in the flat layout: one strided pass per parameter (a copy,
    or an add of ``onto``'s slice); backward: the cotangent (summed to ``onto``'s shape) for ``onto``,
    _Unflatten for the parts."""

    @staticmethod
    def forward(ctx, onto, spec, in_place, *parts):
        ctx.spec, ctx.present = spec, [p is not None for p in parts]
        ctx.onto_shape = None if onto is None else onto.shape
        lead = _lead(parts, spec)
        if lead is None:
            lead = onto.shape[:-1]
        if in_place:  # onto's memory under a tensor autograd does not see as a view of onto
            flat = onto.new_empty(0).set_(onto.untyped_storage(), onto.storage_offset(), onto.shape, onto.stride())
        else:
            flat = (onto if onto is not None else next(p for p in parts if p is not None)).new_empty(*lead, sum(spec[0]))
        base = (None,) * len(parts) if onto is None else _views(onto, spec)
        for view, part, under in zip(_views(flat, spec), parts, base):
            if part is None:
                if not in_place:
                    view.zero_() if under is None else view.copy_(under)
            elif under is None:
                view.copy_(part)
            else:
                torch.add(under, part, out=view)
        return flat

    @staticmethod
    def backward(ctx, grad_flat):
        views = _Unflatten.apply(grad_flat, ctx.spec, False)
        onto = None if ctx.onto_shape is None else grad_flat.sum_to_size(ctx.onto_shape)
        return (onto, None, None,
                *(v if present else None for v, present in zip(views, ctx.present)))
