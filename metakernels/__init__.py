"""metakernels: fast, exact meta-learning for PyTorch language models.

See README.md.  ``metakernels.ops`` holds the fused task-batched kernels; :class:`MAML` and
:class:`MetaSGD` run meta-gradient descent on them; :func:`backend_info` says which implementation
runs where, and why.
"""
from . import ops
from ._backend import BackendUnavailableError, backend_info, use_backend
from .maml import MAML, AdaptedModel, MetaSGD

__version__ = "0.1.0"
__all__ = ["ops", "MAML", "MetaSGD", "AdaptedModel", "backend_info", "use_backend", "BackendUnavailableError",
           "__version__"]
