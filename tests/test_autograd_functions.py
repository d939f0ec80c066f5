"""Every torch.autograd.Function of the package caches its forward's signature (metakernels._autograd):
Function.apply binds each call's arguments to it, and deriving it anew costs ~70 us a call."""
import importlib
import inspect
import pkgutil

import torch

import metakernels


def _package_functions():
    for info in pkgutil.walk_packages(metakernels.__path__, "metakernels."):
        if info.name.endswith(("_triton", "__main__")):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, torch.autograd.Function) \
                    and value.__module__ == module.__name__:
                yield value


def test_every_function_caches_its_forward_signature():
    functions = list(_package_functions())
    assert len(functions) >= 15  # the fused layers, the update ops, the layout's, MAML's
    for function in functions:
        assert "__signature__" in vars(function.forward), f"{function.__qualname__} lacks @cached_signature"
        assert function.forward.__signature__ == inspect.Signature.from_callable(function.forward, follow_wrapped=False)
