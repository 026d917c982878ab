"""The expected failures of training and of reading its run folders, under one base.

``fineserve train`` and ``fineserve export`` print a ``TrainingError`` as one ``error: ...`` line;
anything else is a bug and keeps its traceback. Standard library only, so a command line can
catch these without importing torch.
"""

from __future__ import annotations


class TrainingError(ValueError):
    """A failure the user can fix (a recipe, the data, a run folder, a backbone name)."""


class ConfigError(TrainingError):
    """A recipe or override that cannot describe a run; the message names the key."""


class DatasetError(TrainingError):
    """The dataset is missing, unreadable, or its labels are not what the recipe expects."""


class CheckpointError(TrainingError):
    """A run folder that is missing, incomplete or of another format."""


class UnfinishedRunError(CheckpointError):
    """A run folder whose training was interrupted or failed before it finished."""


class UnknownBackboneError(TrainingError):
    """The backbone name is not one of ``backbones.BACKBONES``."""


class ScoringError(TrainingError):
    """Features or labels a transferability score cannot use (NaN, one class, too few examples)."""
