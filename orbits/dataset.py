"""Old home of the dataset code, kept so that ``from gravprobe.orbits.dataset import X`` keeps working.

The module was split along its sections: :mod:`gravprobe.orbits.spec` (``DatasetSpec`` and its
validation), :mod:`gravprobe.orbits.build` (the array builder and its module caches) and
:mod:`gravprobe.orbits.store` (the folder rule, the writer with its lock and free-space check, the
reader). Every name those modules define is found here too, looked up on first use; new code imports
from ``gravprobe.orbits`` or the module that defines the name.
"""
from __future__ import annotations

from gravprobe.orbits import build as _build
from gravprobe.orbits import spec as _spec
from gravprobe.orbits import store as _store

_MODULES = (_spec, _build, _store)


def __getattr__(name: str):
    for mod in _MODULES:
        if name in vars(mod):
            return vars(mod)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r} (it re-exports "
                         "gravprobe.orbits.spec, .build and .store)")


def __dir__() -> list[str]:
    return sorted({n for mod in _MODULES for n in vars(mod) if not n.startswith("__")})
