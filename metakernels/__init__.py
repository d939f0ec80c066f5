"""metakernels: fast, exact meta-learning for PyTorch language models.

See README.md.  ``metakernels.ops`` holds the fused task-batched kernels; :func:`backend_info` says
which implementation runs where, and why.
"""
from . import ops
from ._backend import BackendUnavailableError, backend_info, use_backend

__version__ = "0.1.0"
__all__ = ["ops", "backend_info", "use_backend", "BackendUnavailableError", "__version__"]
