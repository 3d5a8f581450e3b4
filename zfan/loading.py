"""Finding the user's processing function from a ``module:function`` string."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from .errors import AppError


def load_app(spec: str) -> Callable[[list[Any]], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"app={spec!r}: expected module:function, e.g. zfan.apps:rollup")
    # Like most task runners, apps in the current directory can be named without installing them.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppError(f"app={spec!r}: no module named {exc.name!r}") from None
        raise AppError(f"app={spec!r}: importing {module_name} failed: {exc}") from None
    except Exception as exc:
        raise AppError(f"app={spec!r}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(f"app={spec!r}: module {module_name} has no attribute {attr!r}") from None
    if not callable(obj):
        raise AppError(f"app={spec!r}: {attr} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]
