"""Every public name of metakernels, metakernels.ops, metakernels.nn and metakernels.data is listed in
its module's ``__all__`` and documented, and so is every public method a class of them defines (a
module's ``forward`` is documented by its class)."""
import inspect

import pytest

import metakernels as mk

MODULES = [mk, mk.ops, mk.nn, mk.data]


def _public_objects():
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.ismodule(obj):
                yield f"{module.__name__}.{name}", obj


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_all_lists_every_public_name(module):
    """A public name of metakernels' own is in ``__all__``, or re-exports one listed elsewhere (mk.nn uses
    mk.ops.layer_norm)."""
    listed_elsewhere = {id(obj) for _, obj in _public_objects()}
    unlisted = sorted(name for name, obj in vars(module).items()
                      if not name.startswith("_") and name not in module.__all__
                      and getattr(obj, "__module__", "").startswith("metakernels") and id(obj) not in listed_elsewhere)
    assert not unlisted, unlisted


def test_every_public_object_and_method_has_a_docstring():
    missing = []
    for qualname, obj in _public_objects():
        if callable(obj) and not (obj.__doc__ or "").strip():
            missing.append(qualname)
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if name.startswith("_") or name in ("forward", "extra_repr"):
                    continue
                function = member.fget if isinstance(member, property) else member
                if callable(function) and not (function.__doc__ or "").strip():
                    missing.append(f"{qualname}.{name}")
    assert not missing, missing
