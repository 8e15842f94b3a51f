"""Checks of the arguments a caller passes: one rule per kind of value, one message shape.

A refused argument raises :class:`~citebacktrack.errors.ConfigurationError` (or the
subclass the caller names) that reads ``<name> must be <what>, got <type> <value>; <what
to pass>``: the argument, what was given (its type and its value, cut short) and what to
pass instead. The same rules serve every entry point: the dataclasses' ``__post_init__``
(:func:`check_fields`), :class:`~citebacktrack.Citeformer` and the renderers
(:func:`instance`, :func:`flag`, :func:`choice`), the pydantic inputs (:meth:`Number.field`,
:data:`CASELESS`, whose problems ``types._Input`` words as ``<field>: input should be
<what> (got <type> <value>); <what to pass>``) and the public enums (:class:`Choices`).

The rules:

* a number is never a bool or a string: ``True`` is not 1 and ``"100"`` is not 100; an
  int argument takes any integral number (``numpy.int64`` too, stored as ``int``) but no
  float, not even ``100.0``; a float argument takes ints and floats (stored as ``float``);
* a choice among names (an enum's values, a render style, a fallback) is matched ignoring
  case and surrounding whitespace (``"AUTO"``, ``" auto "``); nothing else is guessed;
* an object argument must be an instance of its class (a ``dict`` is not a ``Budgets``);
* a path is a ``str`` or an ``os.PathLike``, a name or URL a ``str`` (not blank), a mapping
  of options a ``Mapping`` with ``str`` keys, a list of strings a list or tuple (a lone
  ``str`` is not split into characters).

The engine constructors (``LlamaCppBackend``, ``HFBackend``, ``OpenAIBackend``,
``AnthropicBackend``, ``VLLMBackend``, ``LlamaCppServer``), the decoding operators and
``citebacktrack.serve`` use the same rules (:func:`path`, :func:`text`, :func:`member`,
:func:`mapping`, :func:`strings`, :func:`function`).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Self, TypeVar, cast

from pydantic import BeforeValidator, ValidationInfo

from citebacktrack.errors import ConfigurationError

__all__ = [
    "CASELESS",
    "Choices",
    "MismatchError",
    "Number",
    "check_fields",
    "choice",
    "flag",
    "function",
    "instance",
    "mapping",
    "member",
    "path",
    "refused",
    "shown",
    "strings",
    "text",
]

_Enum = TypeVar("_Enum", bound=StrEnum)


def shown(value: object, *, secret: bool = False) -> str:
    """``value`` as an error message shows it: its type and its ``repr``, cut short; a
    ``secret`` string (a client or key argument, which may hold an API key) by its type
    alone."""
    if value is None:
        return "None"
    if secret and isinstance(value, str | bytes):
        return f"{type(value).__name__} (not shown: it may be a key)"
    text = repr(value)
    if len(text) > 60:
        text = f"{text[:57]}..."
    return f"{type(value).__name__} {text}"


def refused(
    name: str,
    value: object,
    what: str,
    hint: str,
    *,
    error: type[ConfigurationError] = ConfigurationError,
    secret: bool = False,
) -> ConfigurationError:
    """The error for ``name`` given ``value``: ``<name> must be <what>, got <value>; <hint>``
    (a ``secret`` string's value is not shown)."""
    return error(f"{name} must be {what}, got {shown(value, secret=secret)}; {hint}")


class MismatchError(ValueError):
    """A pydantic field's value that a rule refused; ``types._Input`` words it."""

    def __init__(self, what: str, hint: str) -> None:
        super().__init__(f"input should be {what}; {hint}")
        self.what = what
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Number:
    """A numeric argument: an int (``whole``) or a real number, never a bool or a string,
    within the bounds (``minimum``/``maximum`` inclusive, ``above``/``below`` exclusive; a
    NaN is in no bounds; an infinity in none when ``finite``); ``None`` as well when
    ``optional``. ``example`` is shown in the hint."""

    example: float
    whole: bool = False
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    optional: bool = False
    below: float | None = None
    finite: bool = False

    @property
    def kind(self) -> str:
        """The type wanted, in words."""
        if self.whole:
            return "a valid integer"
        return f"a valid {'finite ' if self.finite else ''}number (an int or a float)"

    @property
    def what(self) -> str:
        """What a value must be, bounds included."""
        bounds = [
            f"{sign} {_number(bound)}"
            for sign, bound in (
                (">=", self.minimum),
                (">", self.above),
                ("<=", self.maximum),
                ("<", self.below),
            )
            if bound is not None
        ]
        text = " ".join([self.kind, " and ".join(bounds)]) if bounds else self.kind
        return f"{text}, or None" if self.optional else text

    def __call__(self, name: str, value: object) -> Any:
        """``value`` as an ``int`` or ``float`` (``None`` if optional and given), or the
        error naming ``name``."""
        if value is None and self.optional:
            return None
        if not self._typed(value):
            raise refused(name, value, self.what, self.hint(name, value))
        number = int(cast(numbers.Integral, value)) if self.whole else float(cast(float, value))
        if not self._in_bounds(number):
            raise refused(name, value, self.what, self.hint(name, value))
        return number

    def hint(self, name: str, value: object) -> str:
        """What to pass instead of ``value``."""
        field = name.rpartition(".")[2]
        example = f"{field}={_number(self.example)}"
        if self._typed(value):  # out of bounds
            return f"pass e.g. {example}"
        if isinstance(value, str):
            parsed = _parse(value)
            if parsed is not None and (not self.whole or parsed.is_integer()):
                shown_number = _number(parsed) if self.whole else repr(parsed)
                return f"pass the number itself, not a string: {field}={shown_number}"
            return f"pass a number, e.g. {example}"
        if isinstance(value, bool):
            return f"True and False are not numbers; pass e.g. {example}"
        if self.whole and isinstance(value, numbers.Real):
            if math.isfinite(value) and float(value).is_integer():
                return f"pass an int: {field}={int(float(value))}"
            return f"pass a whole number, e.g. {example}"
        return f"pass e.g. {example}"

    def field(self) -> BeforeValidator:
        """This rule's type check for a pydantic field (``Annotated[int, rule.field()]``):
        pydantic's own bounds (``Field(ge=...)``) then apply to what passes."""

        def check(value: Any, info: ValidationInfo) -> Any:
            if value is None and self.optional:
                return value
            if not self._typed(value):
                name = info.field_name or "value"
                raise MismatchError(f"{self.kind}, not a bool or a string", self.hint(name, value))
            return value

        return BeforeValidator(check)

    def _typed(self, value: object) -> bool:
        kind = numbers.Integral if self.whole else numbers.Real
        return isinstance(value, kind) and not isinstance(value, bool)

    def _in_bounds(self, number: float) -> bool:
        return (
            (self.minimum is None or number >= self.minimum)
            and (self.above is None or number > self.above)
            and (self.maximum is None or number <= self.maximum)
            and (self.below is None or number < self.below)
            and not math.isnan(number)
            and (math.isfinite(number) or not self.finite)
        )


def _number(value: float) -> str:
    """``3`` for 3.0, else the float's repr."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def _parse(text: str) -> float | None:
    """The finite number ``text`` spells, if it spells one."""
    try:
        number = float(text.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def check_fields(obj: object, rules: Mapping[str, Callable[[str, object], object]]) -> None:
    """Check each named field of the frozen dataclass ``obj`` with its rule and store what
    the rule returns (an ``int`` for a ``numpy.int64``, say); the field is named
    ``Class.field`` in the error."""
    owner = type(obj).__name__
    for field, rule in rules.items():
        object.__setattr__(obj, field, rule(f"{owner}.{field}", getattr(obj, field)))


def instance(name: str, value: object, cls: type, hint: str, *, optional: bool = True) -> Any:
    """``value`` if it is a ``cls`` (or ``None`` when ``optional``), else the error naming
    ``name``; a mapping gets a hint to unpack it into ``cls``."""
    if isinstance(value, cls) or (value is None and optional):
        return value
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        hint = f"{hint} (a dict is not taken as one: pass {cls.__name__}(**your_dict))"
    raise refused(name, value, f"a {cls.__name__}", hint)


def flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else the error naming ``name`` (``"no"`` is not False)."""
    if isinstance(value, bool):
        return value
    raise refused(name, value, "True or False", f"pass {name}=True or {name}=False")


def choice(name: str, value: object, options: Iterable[str]) -> str:
    """The option ``value`` names, ignoring case and surrounding whitespace, else the error
    naming ``name`` and the options."""
    wanted = tuple(options)
    if isinstance(value, str):
        key = value.strip().casefold()
        for option in wanted:
            if option.casefold() == key:
                return option
    listed = ", ".join(repr(option) for option in wanted)
    raise refused(name, value, f"one of {listed}", "any case is accepted")


def member(name: str, value: object, enum: type[_Enum]) -> _Enum:
    """The member of ``enum`` that ``value`` (a member or its value, in any case) names,
    else the error naming ``name`` and the values."""
    return enum(choice(name, value, [item.value for item in enum]))


def path(name: str, value: object, hint: str, *, optional: bool = True) -> Any:
    """``value`` if it is a ``str`` or an ``os.PathLike`` (or ``None`` when ``optional``),
    else the error naming ``name``."""
    if isinstance(value, str | os.PathLike) or (value is None and optional):
        return value
    what = "a path (a str or an os.PathLike such as pathlib.Path)"
    raise refused(name, value, f"{what}, or None" if optional else what, hint)


def text(
    name: str, value: object, hint: str, *, optional: bool = False, blank: bool = False
) -> Any:
    """``value`` if it is a ``str``, not blank unless ``blank`` (or ``None`` when
    ``optional``), else the error naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, str) and (blank or value.strip()):
        return value
    what = "a str" if blank else "a non-empty str"
    raise refused(name, value, f"{what}, or None" if optional else what, hint)


def mapping(name: str, value: object, hint: str, *, optional: bool = True) -> Any:
    """``value`` if it is a ``Mapping`` with ``str`` keys (or ``None`` when ``optional``),
    else the error naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return value
    what = "a dict with str keys"
    raise refused(name, value, f"{what}, or None" if optional else what, hint)


def strings(name: str, value: object, hint: str) -> tuple[str, ...]:
    """``value`` as a tuple if it is a list or tuple of ``str`` (a lone ``str`` is not
    split into characters), else the error naming ``name`` (or the item)."""
    if not isinstance(value, list | tuple):
        raise refused(name, value, "a list of str", hint)
    for number, item in enumerate(value):
        if not isinstance(item, str):
            raise refused(f"{name}[{number}]", item, "a str", hint)
    return tuple(value)


def function(name: str, value: object, hint: str, *, optional: bool = True) -> Any:
    """``value`` if it is callable (or ``None`` when ``optional``), else the error naming
    ``name``."""
    if callable(value) or (value is None and optional):
        return value
    raise refused(name, value, "a function, or None" if optional else "a function", hint)


def _caseless(value: Any) -> Any:
    return value.strip().casefold() if isinstance(value, str) else value


CASELESS = BeforeValidator(_caseless)
"""A pydantic ``Literal`` of lower-case names matched ignoring case and surrounding space."""


class Choices(StrEnum):
    """A ``StrEnum`` whose values are also found ignoring case and surrounding whitespace
    (``CitationMode("AUTO")``, also in pydantic fields); any other value raises
    :class:`~citebacktrack.errors.ConfigurationError` naming the enum and its values."""

    @classmethod
    def _missing_(cls, value: object) -> Self:
        if isinstance(value, str):
            key = value.strip().casefold()
            for member in cls:
                if member.value.casefold() == key:
                    return member
        listed = ", ".join(repr(member.value) for member in cls)
        raise refused(
            cls.__name__,
            value,
            f"one of {listed}",
            f"pass one of those values (any case) or a {cls.__name__} member",
        )
