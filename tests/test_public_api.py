"""What ``import hyperinf`` offers: the engine, its config, and every error and warning the library raises."""

from __future__ import annotations

import inspect

import hyperinf
from hyperinf import errors


def test_every_error_and_warning_class_is_exported() -> None:
    defined = {name for name, obj in inspect.getmembers(errors, inspect.isclass) if obj.__module__ == errors.__name__}
    assert defined <= set(hyperinf.__all__)
    assert all(getattr(hyperinf, name) is getattr(errors, name) for name in defined)


def test_errors_derive_from_hyperinf_error_and_warnings_from_user_warning() -> None:
    for name in hyperinf.__all__:
        obj = getattr(hyperinf, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            base = UserWarning if name.endswith("Warning") else hyperinf.HyperinfError
            assert issubclass(obj, base), name
