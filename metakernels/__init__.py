"""metakernels: fast, exact meta-learning for PyTorch language models.

See README.md.  ``metakernels.ops`` holds the fused task-batched kernels; :class:`MAML` and
:class:`MetaSGD` run meta-gradient descent on them (``metakernels.nn`` swaps fused, twice-differentiable
layers into a model); :class:`LearnedOptimizer` (meta-trained with
:class:`LearnedOptimizerTrainer`, or with evolution-strategies estimates from :class:`ESEstimator`) is
the meta-neural network; :func:`backend_info` says which implementation
runs where, and why.  ``metakernels.data`` samples few-shot task batches; ``python -m metakernels train``
is the main job (``metakernels.training``).
"""
from . import data, nn, ops
from ._backend import BackendUnavailableError, backend_info, use_backend
from .attention_masks import additive_attention_mask
from .bound_model import BoundModel
from .checkpoint import CheckpointError
from .learned_optimizer import LearnedOptimizer
from .lopt_es import ESEstimator, ESResult
from .lopt_training import LearnedOptimizerTrainer, UnrollResult, UnrollState
from .maml import MAML, AdaptedModel, MetaSGD
from .recompute_guard import RecomputedForwardError

__version__ = "0.1.0"
__all__ = ["ops", "nn", "data", "MAML", "MetaSGD", "AdaptedModel", "BoundModel", "LearnedOptimizer", "LearnedOptimizerTrainer", "UnrollState",
           "UnrollResult", "ESEstimator", "ESResult", "CheckpointError", "RecomputedForwardError", "backend_info", "use_backend", "additive_attention_mask", "BackendUnavailableError", "__version__"]
