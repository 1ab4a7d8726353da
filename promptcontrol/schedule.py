"""When and where: step schedules of edits, and the one ``steps=`` / ``sites=`` vocabulary of every controller.

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

import fnmatch
from dataclasses import dataclass
from numbers import Real
from typing import Any, Callable, Mapping, Sequence, Union

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


# ---- the one vocabulary of "when" and "where" ------------------------------------------------------------------
# Every controller, the store, heat maps and the CLI read ``steps=`` and ``sites=`` through these two functions.

StepSpec = Union[None, tuple, list, range, set, frozenset, Callable[[Any], bool]]
SiteSpec = Union[None, str, Sequence[str], Mapping[str, Any], Callable[[Any], bool]]

PLACES = ("down", "mid", "up")
SITE_KEYS = ("places", "levels", "blocks", "kinds", "streams", "names")


def _is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def step_filter(spec: StepSpec, what: str = "steps") -> Callable[[Any], bool]:
    """``ctx -> bool`` for a steps spec (``ctx``: a :class:`~promptcontrol.context.StepContext`).

    - ``None``: every step;
    - a pair ``(start, end)`` with a float in it: fractions of the run, the window ``int(start*T) <= i < int(end*T)``
      (:meth:`Window.contains`, the only copy of that rule);
    - a pair of ints ``(start, end)``: step indices ``start <= i < end``;
    - a list / range / set of ints: exactly those step indices (0 = the first denoising step);
    - a callable ``f(ctx) -> bool``.
    """
    if spec is None:
        return lambda ctx: True
    if callable(spec) and not isinstance(spec, (list, tuple, range, set, frozenset)):
        return spec
    if isinstance(spec, tuple):
        if len(spec) != 2 or not all(_is_number(x) for x in spec):
            raise ValueError(
                f"{what}={spec!r}: a tuple must be a (start, end) pair — fractions like (0.0, 0.5) or step indices "
                "like (0, 10); for exactly some steps give a list, e.g. [0, 1, 2]"
            )
        start, end = spec
        if isinstance(start, float) or isinstance(end, float):
            win = window((start, end), what)

            def in_fraction_window(ctx) -> bool:
                if not ctx.total:
                    raise ValueError(
                        f"{what} given as fractions need the number of steps, which a bare UNet call does not tell; "
                        f"give step indices instead, e.g. {what}=(0, 10) or {what}=[0, 1, 2]"
                    )
                return win.contains(ctx.index, ctx.total)

            return in_fraction_window
        if start < 0 or end < start:
            raise ValueError(f"{what}={spec!r} as step indices needs 0 <= start <= end")
        return lambda ctx: start <= ctx.index < end
    if isinstance(spec, (list, range, set, frozenset)):
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in spec):
            raise ValueError(f"{what} as a list must hold step indices (ints >= 0, 0 = the first step); got {spec!r}")
        chosen = frozenset(spec)
        if not chosen:
            raise ValueError(f"{what} is empty: nothing would be selected; pass None for every step")
        return lambda ctx: ctx.index in chosen
    raise TypeError(
        f"{what} must be None (every step), a (start, end) pair of fractions (floats in [0, 1]) or of step indices "
        f"(ints), a list / range of step indices, or a function of the StepContext; got {spec!r}"
    )


def _as_tuple(value, what: str) -> tuple:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a value or a list of values; got {value!r}") from None
    if not items:
        raise ValueError(f"{what} is empty: nothing would be selected; leave it out to keep every site")
    return items


def _name_matches(site, patterns: tuple[str, ...]) -> bool:
    names = (site.key, site.module_path)
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns for name in names)


def site_filter(spec: SiteSpec, what: str = "sites") -> Callable[[Any], bool]:
    """``site -> bool`` for a sites spec (``site``: an :class:`~promptcontrol.sites.AttentionSite`).

    - ``None``: every site (the caller still keeps only the kinds it acts on, e.g. cross-attention);
    - a place ``"down"`` / ``"mid"`` / ``"up"`` (UNet), or a module path / processor key, shell patterns allowed
      (``"up_blocks.1.*"``, ``"transformer_blocks.3.attn"``);
    - a list of those: a site matching any of them;
    - a dict with any of ``places``, ``levels``, ``blocks``, ``kinds``, ``streams``, ``names``: a site matching all;
    - a callable ``f(site) -> bool``.
    """
    if spec is None:
        return lambda site: True
    if callable(spec) and not isinstance(spec, (str, Mapping, list, tuple)):
        return spec
    if isinstance(spec, str) or (isinstance(spec, Sequence) and not isinstance(spec, Mapping)):
        items = _as_tuple(spec, what)
        if not all(isinstance(s, str) for s in items):
            raise TypeError(f"{what} as a list must hold places or module paths (str); got {spec!r}")
        places = tuple(s for s in items if s in PLACES)
        patterns = tuple(s for s in items if s not in PLACES)
        bare = [s for s in patterns if not any(c in s for c in ".*?[")]  # no place, no path, no pattern: a typo
        if bare:
            raise ValueError(
                f"unknown place(s) {bare} in {what}; places are {', '.join(PLACES)}, or give module paths / patterns "
                "such as 'up_blocks.1.*' or 'transformer_blocks.3.attn'"
            )
        return lambda site: site.place in places or _name_matches(site, patterns)
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"{what} must be None, a place ({', '.join(PLACES)}), a module path or pattern, a list of those, a dict "
            f"with {', '.join(SITE_KEYS)}, or a function of the AttentionSite; got {spec!r}"
        )
    unknown = sorted(set(spec) - set(SITE_KEYS))
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; use {', '.join(SITE_KEYS)}")
    tests: list[Callable[[Any], bool]] = []
    if spec.get("places") is not None:
        places = _as_tuple(spec["places"], f"{what}['places']")
        bad = [p for p in places if p not in PLACES]
        if bad:
            raise ValueError(f"unknown place(s) {bad} in {what}; places are {', '.join(PLACES)}")
        tests.append(lambda site: site.place in places)
    for key, attribute in (("levels", "level"), ("blocks", "block")):
        if spec.get(key) is not None:
            values = _as_tuple(spec[key], f"{what}[{key!r}]")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise ValueError(f"{what}[{key!r}] must hold ints >= 0; got {spec[key]!r}")
            tests.append(lambda site, a=attribute, vs=frozenset(values): getattr(site, a) in vs)
    for key, attribute in (("kinds", "kind"), ("streams", "stream")):
        if spec.get(key) is not None:
            values = frozenset(_as_tuple(spec[key], f"{what}[{key!r}]"))
            tests.append(lambda site, a=attribute, vs=values: getattr(site, a, None) in vs)
    if spec.get("names") is not None:
        patterns = _as_tuple(spec["names"], f"{what}['names']")
        tests.append(lambda site: _name_matches(site, patterns))
    return lambda site: all(test(site) for test in tests)
