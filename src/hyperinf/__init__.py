"""hyperinf: influence-function data attribution with HyperINF and its baselines."""

from hyperinf.config import InfluenceConfig
from hyperinf.engine import InfluenceEngine
from hyperinf.errors import (
    BlockSelectionError,
    CheckpointMismatchError,
    ConfigurationError,
    DataError,
    DataOrderError,
    DeadBlockWarning,
    EmptyDataError,
    FitMismatchError,
    HyperinfError,
    LossShapeError,
    MissingPackageError,
    NonFiniteGradientError,
    NotConvergedError,
    NotConvergedWarning,
    NotFittedError,
    NotSPDError,
    ResumedWarning,
    SpillWarning,
)
from hyperinf.task import LossTask, Task

__version__ = "0.1.0"

__all__ = [
    "BlockSelectionError",
    "CheckpointMismatchError",
    "ConfigurationError",
    "DataError",
    "DataOrderError",
    "DeadBlockWarning",
    "EmptyDataError",
    "FitMismatchError",
    "HyperinfError",
    "InfluenceConfig",
    "InfluenceEngine",
    "LossTask",
    "LossShapeError",
    "MissingPackageError",
    "NonFiniteGradientError",
    "NotConvergedError",
    "NotConvergedWarning",
    "NotFittedError",
    "NotSPDError",
    "ResumedWarning",
    "SpillWarning",
    "Task",
    "__version__",
]
