"""The compression methods, one file each: a config dataclass registered with
``@register(family, name)`` and its scoring (KV eviction, structured pruning) or selection (token
reduction). Every module in this folder is imported here, so a new method is its file alone."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
