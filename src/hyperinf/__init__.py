"""hyperinf: influence-function data attribution with HyperINF and its baselines."""

from hyperinf.config import InfluenceConfig
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import (
    BlockSelectionError,
    DataError,
    DeadBlockWarning,
    EmptyDataError,
    HyperinfError,
    LossShapeError,
    MissingPackageError,
    NonFiniteGradientError,
    NotConvergedWarning,
    NotFittedError,
    NotSPDError,
    SpillWarning,
)

__version__ = "0.1.0"

__all__ = [
    "BlockSelectionError",
    "DataError",
    "DeadBlockWarning",
    "EmptyDataError",
    "HyperinfError",
    "InfluenceConfig",
    "InfluenceEngine",
    "LossShapeError",
    "MissingPackageError",
    "NonFiniteGradientError",
    "NotConvergedWarning",
    "NotFittedError",
    "NotSPDError",
    "SpillWarning",
    "__version__",
]
