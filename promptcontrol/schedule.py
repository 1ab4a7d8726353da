"""Step schedules: on which denoising steps an edit acts.

A schedule is given as

* a fraction ``f`` — the first ``f`` of the steps, i.e. the window ``(0, f)``;
* a pair ``(start, end)`` of fractions — steps from ``start`` up to (not including) ``end``;
* a dict ``{word: fraction or pair, "default": fraction or pair}`` — per-word windows (cross-attention only);
  the words are words or phrases of the *edited* prompt (as in prompt-to-prompt); words not named use
  ``"default"`` (or the caller's default when the dict has no ``"default"`` key).

Step ``i`` of ``T`` is inside the window ``(start, end)`` when ``int(start * T) <= i < int(end * T)`` (the same
rule as ``pc.Reweight``'s fraction windows), so
``0.8`` of 50 steps is steps 0..39 and ``0`` is no step at all. (Prompt-to-prompt computes its cross window
over ``T + 1`` rows and its self window over ``T``; this module uses ``T`` for both, which differs from it by
at most one step at a window's end.)
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Mapping, Union

Fraction = Union[float, int]
WindowLike = Union[Fraction, tuple, list]
ScheduleLike = Union[WindowLike, Mapping[str, WindowLike]]

DEFAULT_KEYS = ("default", "default_")


@dataclass(frozen=True)
class Window:
    """A step window ``[start, end)`` in fractions of the run, ``0 <= start <= end <= 1``."""

    start: float
    end: float

    def step_range(self, total: int) -> tuple[int, int]:
        """First step inside and first step after the window, for a run of ``total`` steps."""
        return int(self.start * total + 1e-9), int(self.end * total + 1e-9)  # 0.7 * 10 is 7, not 6.999...

    def contains(self, index: int, total: int) -> bool:
        """Whether step ``index`` (0-based) of a run of ``total`` steps is inside the window."""
        first, stop = self.step_range(total)
        return first <= index < stop

    @property
    def is_empty(self) -> bool:
        return self.end <= self.start


def _fraction(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{what} must be a number in [0, 1], got {type(value).__name__}: {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} = {value} is outside [0, 1]: give fractions of the denoising steps, e.g. 0.8")
    return value


def window(value: WindowLike, what: str = "steps") -> Window:
    """A :class:`Window` from a fraction or a ``(start, end)`` pair; raises a clear error on bad input."""
    if isinstance(value, Window):
        return value
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} as a pair must be (start, end), got {len(value)} values: {value!r}")
        start = _fraction(value[0], f"{what} start")
        end = _fraction(value[1], f"{what} end")
        if start > end:
            raise ValueError(f"{what} = ({start}, {end}): start is after end; write (start, end) with start <= end")
        return Window(start, end)
    return Window(0.0, _fraction(value, what))


@dataclass(frozen=True)
class Schedule:
    """A default window and per-word windows (word or phrase of the edited prompt → window)."""

    default: Window
    words: tuple[tuple[str, Window], ...] = ()

    @property
    def is_per_word(self) -> bool:
        return bool(self.words)


def schedule(value: ScheduleLike, default: WindowLike, what: str = "cross_steps", per_word: bool = True) -> Schedule:
    """Parse a schedule: a fraction, a ``(start, end)`` pair or (when ``per_word``) a per-word dict."""
    if isinstance(value, Mapping):
        if not per_word:
            raise TypeError(
                f"{what} takes a fraction or a (start, end) pair; per-word schedules apply to cross_steps only"
            )
        base = window(default, f"{what} default")
        words = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{what} keys must be words of the edited prompt (str), got {key!r}")
            if key in DEFAULT_KEYS:
                base = window(item, f"{what}[{key!r}]")
            else:
                words.append((key, window(item, f"{what}[{key!r}]")))
        return Schedule(base, tuple(words))
    return Schedule(window(value, what))
