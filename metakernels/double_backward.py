"""Second order differentiates every layer's backward.  Where a layer's backward has no derivative, autograd
records a node that raises only when the meta-gradient reaches it, deep in ``.backward()``; this looks
through the inner gradients' graph once for such nodes, so that the layer is named, with advice, before."""
from __future__ import annotations

import torch

from .graph_leaves import graph_nodes

# Nodes autograd records in place of a derivative it cannot take (DelayedError, NotImplemented), and the
# backward nodes of ops whose derivative torch leaves not implemented (torch 2.14.1: EmbeddingBag's
# backward, which raised "the derivative for '_embedding_bag_backward' is not implemented" in .backward()).
NOT_DIFFERENTIABLE_NODES = ("torch::autograd::Error", "torch::autograd::NotImplemented",
                            "EmbeddingBagBackwardBackward0")


def refuse_layers_without_double_backward(inner_result: torch.Tensor, where: str) -> None:
    """RuntimeError naming the first node of ``inner_result``'s graph (built from inner gradients taken with
    create_graph=True) that cannot be differentiated, with advice; ``where`` names the algorithm."""
    for node in graph_nodes([inner_result.grad_fn]):
        if node.name() in NOT_DIFFERENTIABLE_NODES:
            raise RuntimeError(
                f"{where} differentiates the inner gradients, but a layer of this model has no double backward "
                f"(autograd node {node.name()}: a once_differentiable function or an op without a second "
                "derivative, such as a fused attention kernel called directly, or nn.EmbeddingBag). Use "
                "first_order=True, or replace that layer with a twice-differentiable one (torch's "
                "scaled_dot_product_attention is: second order runs it on its math backend; nn.Embedding "
                "followed by a sum or mean is, for an EmbeddingBag).")
