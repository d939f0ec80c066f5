"""The meta-gradients compared between one process and two (tests/test_distributed.py): float64, the
small transformer LM with LayerNorm, attention, embeddings and GELU, seeded so that every process
builds the same model and task batch."""
import torch

import metakernels as mk
from metakernels.models import TransformerLM, lm_loss


def setup(algo: str, T: int):
    torch.manual_seed(0)
    model = TransformerLM(vocab=17, d_model=16, n_heads=2, n_layers=1, max_len=8).double()
    support = torch.randint(17, (T, 2, 7))
    query = torch.randint(17, (T, 2, 7))
    if algo in ("maml", "ddp"):
        module = mk.MAML(model, inner_lr=0.3, inner_steps=2)
    elif algo == "ddp-chunked":  # the meta-gradient taken in the forward, chunk by chunk
        module = mk.MAML(model, inner_lr=0.3, inner_steps=2, task_chunk=1)
    elif algo == "maml-sparse":  # the token embedding shared, not adapted, and its meta-gradient sparse
        model.tok.sparse = True
        module = mk.MAML(model, inner_lr=0.3, inner_steps=2, adapt=lambda name, _: name != "tok.weight")
    elif algo == "metasgd":
        module = mk.MetaSGD(model, inner_lr=0.3, inner_steps=2)
    else:
        module = mk.LearnedOptimizer(hidden=4, layers=1, hyper=mk.ops.LoptHyper(step_mult=0.05), seed=0).double()
        # NOTE: a loop over tasks, not vmap: one task is always evaluated without vmap, and the learned step
        # amplifies the 1e-16 differences between the vmapped and the plain evaluation of the model to
        # 1e-10 of the meta-gradient (measured: a batch of 2 tasks minus its first task alone, against the
        # second alone, differ by 3.9e-10 with vmap and 3.8e-16 with the loop), whatever the process count.
        module.trainer = mk.LearnedOptimizerTrainer(module, model, vectorize=False)
    return module, support, query


def meta_gradients(algo, module, support, query, forward=None):
    """The mean-over-tasks meta-loss of this task batch, backpropagated; returns the trained parameters."""
    if algo == "lopt":
        loss = module.trainer.unroll(lm_loss, support, 2, query=query, meta_loss="query").meta_loss
    else:
        loss = (forward or module)(lm_loss, support, query)
    loss.backward()
    return {"params": [p for p in module.parameters() if p.requires_grad]}
