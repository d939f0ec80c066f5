"""What every torch.autograd.Function of the package shares."""
from __future__ import annotations

import inspect


def cached_signature(function_cls):
    """Class decorator: stores ``forward``'s signature on it as ``__signature__``, which
    ``inspect.signature`` returns as it is.  ``Function.apply`` binds every call's arguments to
    ``forward``'s signature (Functions with a ``setup_context``, as vmap needs), and deriving the
    signature anew took ~70 us a call: ~10 ms of a meta-step's ~400 calls."""
    forward = function_cls.forward
    forward.__signature__ = inspect.signature(forward)
    return function_cls
