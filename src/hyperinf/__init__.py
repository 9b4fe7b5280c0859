"""hyperinf: influence-function data attribution with HyperINF and its baselines."""

from hyperinf.errors import (
    BlockSelectionError,
    EmptyDataError,
    HyperinfError,
    LossShapeError,
    NonFiniteGradientError,
    NotConvergedWarning,
    NotFittedError,
    NotSPDError,
)

__version__ = "0.1.0"

__all__ = [
    "BlockSelectionError",
    "EmptyDataError",
    "HyperinfError",
    "LossShapeError",
    "NonFiniteGradientError",
    "NotConvergedWarning",
    "NotFittedError",
    "NotSPDError",
    "__version__",
]
