"""A recipe's ``search:`` section: which recipe keys a tuning study varies, and over what.

    search:
      lr: {low: 3.0e-4, high: 3.0e-3, log: true}   # a range of a float key (log scale)
      epochs: {low: 2, high: 4}                      # a range of an integer key
      crop_padding: {low: 0, high: 4, step: 2}       # ... with a step
      image_size: [48, 64, 96]                       # a list: one of these values
      hflip: [true, false]

Whether a range is drawn as integers or floats follows the key's type in ``TrainConfig``.
Every range end and every choice is checked up front through the same ``build_config`` a run
uses, so a bad entry fails before any trial starts, with a message naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

from fineserve.training.config import SEARCH_KEY, TrainConfig, build_config
from fineserve.training.errors import ConfigError

RANGE_KEYS = {"low", "high", "log", "step"}
Choice = None | bool | int | float | str


class Trial(Protocol):
    """The part of ``optuna.Trial`` a search space asks for values."""

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class Range:
    """A numeric range of one key: integers when the key is an integer, else floats."""

    key: str
    low: float
    high: float
    integer: bool
    log: bool = False
    step: float | None = None

    def suggest(self, trial: Trial) -> int | float:
        if self.integer:
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def ends(self) -> list[int | float]:
        return [int(self.low), int(self.high)] if self.integer else [self.low, self.high]


@dataclass(frozen=True)
class Choices:
    """One of a list of values."""

    key: str
    values: tuple[Choice, ...]

    def suggest(self, trial: Trial) -> Choice:
        value: Choice = trial.suggest_categorical(self.key, list(self.values))
        return value

    def ends(self) -> list[Choice]:
        return list(self.values)


Dimension = Range | Choices


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]

    def suggest(self, trial: Trial) -> dict[str, Any]:
        """One value per key, drawn by the trial's sampler."""
        return {d.key: d.suggest(trial) for d in self.dimensions}


# Keys a search must not vary: they change how trials are compared, not what they learn.
NOT_SEARCHED = {
    "eval_every_epochs": "cannot be searched: the pruner compares trials at the epochs they validate "
    "in, so trials must share it; set it in the recipe",
}


def parse_search(section: Any, base: dict[str, Any], where: str) -> SearchSpace:
    """The recipe's ``search:`` section as a ``SearchSpace``; ``base`` is the rest of the recipe
    (with overrides), against which every range end and choice must make a valid run.

    Raises:
        ConfigError: no section, or an entry that is not a known key, a range or a list of choices,
            or a value that the recipe cannot run with (the message names ``search.KEY``).
    """
    if section is None:
        raise ConfigError(
            f"{where}: the recipe has no `{SEARCH_KEY}:` section; add one naming the keys to tune "
            "(see docs/training.md, Tuning)"
        )
    if not isinstance(section, dict) or not section:
        raise ConfigError(f"{where}: `{SEARCH_KEY}:` must map recipe keys to a range or a list of choices")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    dimensions = []
    for key, spec in section.items():
        if key not in types:
            raise ConfigError(f"{SEARCH_KEY}.{key}: not a recipe key; see `fineserve train --help`")
        if key in NOT_SEARCHED:
            raise ConfigError(f"{SEARCH_KEY}.{key}: {NOT_SEARCHED[key]}")
        dimension = _dimension(str(key), spec, types[key])
        for value in dimension.ends():
            try:
                build_config({**base, key: value})
            except ConfigError as err:
                raise ConfigError(f"{SEARCH_KEY}.{key}: {value!r} cannot run: {err}") from None
        dimensions.append(dimension)
    return SearchSpace(tuple(dimensions))


def _dimension(key: str, spec: Any, type_text: str) -> Dimension:
    name = f"{SEARCH_KEY}.{key}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{name}: an empty list of choices")
        if not all(v is None or isinstance(v, bool | int | float | str) for v in spec):
            raise ConfigError(f"{name}: choices must be numbers, strings, true/false or null")
        return Choices(key, tuple(spec))
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{name}: expected a range {{low: ..., high: ...}} or a list of choices, got {spec!r}"
        )
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown:
        raise ConfigError(f"{name}: unknown field {unknown[0]!r} (a range has low, high, log, step)")
    integer = type_text.startswith("int")
    if not (integer or type_text.startswith("float")):
        raise ConfigError(f"{name}: {key} is not a number; give a list of choices instead of a range")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{name}: a range needs both low and high")
    low, high = _number(name, "low", spec["low"], integer), _number(name, "high", spec["high"], integer)
    step = _number(name, "step", spec["step"], integer) if spec.get("step") is not None else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{name}: log must be true or false, got {log!r}")
    if low > high:
        raise ConfigError(f"{name}: low {low} is above high {high}")
    if log and low <= 0:
        raise ConfigError(f"{name}: a log range needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{name}: step must be > 0 and cannot go with log")
    return Range(key, low, high, integer, log, step)


def _number(name: str, field: str, value: Any, integer: bool) -> float:
    if integer:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: {field} must be an integer, got {value!r}")
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ConfigError(f"{name}: {field} must be a number, got {value!r}")
