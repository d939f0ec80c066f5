"""Drop-in modules that run the fused, twice-differentiable layer ops, and :func:`fuse_layers`, which swaps
them into an existing model.

    changes = mk.nn.fuse_layers(model)      # in place; returns what it changed, one line per module
    maml = mk.MAML(model, fused_layers=True)   # the same, done by MAML

Each fused module is a subclass of the torch module it replaces, with the same parameters, buffers,
state_dict keys and hooks (the swap changes the module's class and nothing else), so optimizers, saved
checkpoints and parameter orders are unaffected.  What is swapped:

* ``nn.LayerNorm`` over the last dimension -> :class:`LayerNorm` (``metakernels.ops.layer_norm``);
* ``nn.RMSNorm`` over the last dimension -> :class:`RMSNorm` (``metakernels.ops.rms_norm``);
* ``nn.Linear`` directly followed by ``nn.GELU`` in an ``nn.Sequential`` -> :class:`LinearGELU` (the
  matrix product, then the fused bias + GELU) and ``nn.Identity`` in the GELU's place, unless the model
  holds that Linear in more than one place (the GELU would then apply at every use), or a forward or
  backward hook is on either module or on every module (a hook on the Linear would see the GELU's output,
  and the GELU's own would no longer run); such a Linear is kept and listed.  NOTE: a forward that calls
  the Sequential's Linear directly (``self.mlp[0](x)``) is not seen and would get the GELU too;
* any other ``nn.GELU`` -> :class:`GELU` (the fused activation, no bias);
* ``metakernels.models.CausalSelfAttention`` -> :class:`CausalSelfAttention` (its core by
  ``metakernels.ops.causal_attention``: head split, scores, mask, softmax, weighted sum, head merge).

Norms over several trailing dimensions are left alone and listed as such.  Other attention code can call
``causal_attention`` on its fused q|k|v projection, or ``causal_softmax`` where it masks and normalises its
scores; the vocabulary head with cross-entropy is
``metakernels.ops.linear_cross_entropy``, called from the loss (it is not a module swap).
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .ops.attention import causal_attention
from .ops.gelu import bias_gelu
from .ops.norm import layer_norm, rms_norm
from .ops.softmax import causal_softmax

__all__ = ["LayerNorm", "RMSNorm", "GELU", "LinearGELU", "CausalSelfAttention", "fuse_layers"]


def _in_common_dtype(norm, x: torch.Tensor, weight: torch.Tensor | None, *rest):
    """``norm(x, weight, *rest)`` for a weight of another dtype, as torch's norm modules take it (float16 or
    bfloat16 activations with float32 weights: under autocast, or norms kept in float32): computed in
    the wider dtype, returned in x's."""
    if weight is None:
        return norm(x, torch.ones(x.shape[-1], dtype=x.dtype, device=x.device), *rest)
    if weight.dtype == x.dtype:
        return norm(x, weight, *rest)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    rest = [r.to(dtype) if isinstance(r, torch.Tensor) else r for r in rest]
    return norm(x.to(dtype), weight.to(dtype), *rest).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension, computed by the fused op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _in_common_dtype(layer_norm, x, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` over the last dimension, computed by the fused op.  eps=None is torch's default: the
    epsilon of the dtype torch computes in, float32 for float16 and bfloat16 inputs (their own epsilon,
    7.8e-3 for bfloat16, would swamp the mean square of small activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps
        if eps is None:
            eps = torch.finfo(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype).eps
        return _in_common_dtype(rms_norm, x, self.weight, eps)


class GELU(nn.GELU):
    """``nn.GELU`` computed by the fused op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_gelu(x, None, self.approximate)


class LinearGELU(nn.Linear):
    """``nn.Linear`` followed by GELU: the matrix product, then the fused bias + GELU.  ``approximate``
    is the GELU's form ("none" or "tanh")."""

    approximate = "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight)
        bias = self.bias if self.bias is None or self.bias.dtype == h.dtype else self.bias.to(h.dtype)  # autocast
        return bias_gelu(h, bias, self.approximate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, approximate={self.approximate!r}"


class CausalSelfAttention(models.CausalSelfAttention):
    """metakernels.models.CausalSelfAttention computed by the fused attention core (the q|k|v split, scores,
    mask, softmax and weighted sum in one op); with attention dropout active (training, p > 0) the products
    stay PyTorch's and only the mask + softmax is fused, so that the dropout mask applies to the weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout.p > 0:
            return super().forward(x)
        return self.proj(causal_attention(self.qkv(x), self.n_heads))

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The fused causal softmax of the scaled scores; q, k: [B, heads, S, d_head] -> [B, heads, S, S]."""
        return causal_softmax(q @ k.transpose(-2, -1), q.shape[-1] ** -0.5)


def fuse_layers(model: nn.Module) -> list[str]:
    """Swaps the fused modules into ``model`` in place (see the module docstring).  Returns one line per
    module looked at: ``"<name>: <old class> -> <new class>"``, or ``"<name>: <class> kept (<why>)"``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_layers: model must be an nn.Module, got {type(model).__name__}")
    changes: list[str] = []
    swaps = ((nn.LayerNorm, LayerNorm), (nn.RMSNorm, RMSNorm))
    classes = ((models.CausalSelfAttention, CausalSelfAttention, "metakernels.models.CausalSelfAttention"),
               (nn.GELU, GELU, "torch.nn.GELU"))
    modules = dict(model.named_modules())
    places = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for name, child in list(modules.items())[1:]:
        parent_name, _, child_name = name.rpartition(".")
        parent = modules[parent_name]
        if getattr(parent, child_name) is not child:  # a GELU already folded into its Linear
            continue
        for torch_cls, fused_cls in swaps:
            if type(child) is torch_cls:
                if len(child.normalized_shape) == 1:
                    child.__class__ = fused_cls
                    changes.append(f"{name}: torch.nn.{torch_cls.__name__} -> metakernels.nn.{fused_cls.__name__}")
                else:
                    changes.append(f"{name}: {torch_cls.__name__} kept (normalizes {len(child.normalized_shape)} "
                                   "trailing dimensions; the fused op normalizes the last one)")
        for old_cls, fused_cls, old_name in classes:
            if type(child) is old_cls:
                child.__class__ = fused_cls
                changes.append(f"{name}: {old_name} -> metakernels.nn.{fused_cls.__name__}")
        siblings = list(parent._modules.items())  # every slot: named_children() skips repeated modules
        position = [n for n, _ in siblings].index(child_name)
        if type(child) is nn.Linear and isinstance(parent, nn.Sequential) and position + 1 < len(siblings) \
                and type(siblings[position + 1][1]) is nn.GELU:
            gelu_name, gelu = siblings[position + 1]
            gelu_full = f"{parent_name}.{gelu_name}" if parent_name else gelu_name
            if places[id(child)] > 1:
                changes.append(f"{name}: Linear kept (the model holds it in {places[id(child)]} places; folding "
                               "the GELU after it into it would apply the GELU at every one)")
                continue
            hooked = _hooked({name: child, gelu_full: gelu})
            if hooked:
                changes.append(f"{name}: Linear kept (hooks on {hooked}; folding the GELU after it into it would "
                               "change the Linear's output they see and drop the GELU's own)")
                continue
            child.__class__ = LinearGELU
            child.approximate = gelu.approximate
            setattr(parent, gelu_name, nn.Identity())
            changes.append(f"{name} + {gelu_full}: torch.nn.Linear + torch.nn.GELU "
                           "-> metakernels.nn.LinearGELU + torch.nn.Identity")
    return changes


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(modules: dict[str, nn.Module]) -> str:
    """Which of ``modules`` (by name) have forward or backward hooks, torch's global module hooks
    included: "every module (a global hook)" first where there are any; "" for none."""
    names = [name for name, module in modules.items() if any(getattr(module, h) for h in _MODULE_HOOKS)]
    if any(getattr(nn.modules.module, "_global" + h) for h in _MODULE_HOOKS):
        names.insert(0, "every module (a global hook)")
    return ", ".join(names)
