"""Schema walker: checks msgpack-decoded maps against dataclass type hints (DESIGN.md §10).

:func:`converter_for` builds, once per type hint, a converter that walks a value in either
direction: wire value -> Python (``from_wire=True``: maps become dataclass instances, str
become enum members) or Python -> msgpack-ready value (``from_wire=False``). It supports int,
float, str, bool, ``X | None`` (and other unions), ``list[...]``, ``dict[str, ...]``, nested
dataclasses, ``Literal`` and enums, with per-field constraints carried by ``Annotated``
(:class:`Range`, :class:`Len`, :class:`Pattern`, :class:`PublishSubject`), then by a
dataclass's ``validate()`` hook for cross-field rules (a ``ValueError`` from it is a failure).

The rules: unknown fields are refused (with a "did you mean" hint), required fields must be
present, ``bool`` is not an ``int``, an ``int`` is accepted where a ``float`` is expected,
floats must be finite and ints must fit in what msgpack carries. Lists of bounded numbers (token
ids, probabilities, sparse rows) take a builtins-only fast path when they are certainly valid;
anything else is walked element by element.

Every problem is raised as :class:`Invalid`, whose ``path`` names the field where it happened
(``draft_ids[3]``); :meth:`Invalid.to_error` turns it into ``WispError(BAD_REQUEST)`` naming
the root class too (``VerifyRequest.draft_ids[3]: must be >= 0, got -1``).

The message classes and the codec live in :mod:`common.protocol`; this module knows nothing of
them and, like it, imports neither torch nor the cores.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
import numbers
import re
import sys
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, is_dataclass
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from common.errors import ErrorCode, WispError
from common.subjects import is_publish_subject

__all__ = [
    "INT_MAX",
    "INT_MIN",
    "Conv",
    "Invalid",
    "Len",
    "Pattern",
    "PublishSubject",
    "Range",
    "converter_for",
    "field_names",
    "required_fields",
    "short_repr",
    "type_name",
]

INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what msgpack can carry


# -- field constraints (used inside Annotated[...]) ------------------------------------------
@dataclass(frozen=True, slots=True)
class Range:
    """Numeric bounds of an int or float field."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def error(self, v: float) -> str | None:
        if self.ge is not None and not v >= self.ge:
            return f"must be >= {self.ge}, got {v!r}"
        if self.gt is not None and not v > self.gt:
            return f"must be > {self.gt}, got {v!r}"
        if self.le is not None and not v <= self.le:
            return f"must be <= {self.le}, got {v!r}"
        return None


@dataclass(frozen=True, slots=True)
class Len:
    """Length bounds of a list or str field, checked before its elements are walked."""

    min: int = 0
    max: int | None = None

    def error(self, v: Any) -> str | None:
        n = len(v)
        unit = "characters" if isinstance(v, str) else "entries"
        if n < self.min:
            return "must not be empty" if self.min == 1 else \
                f"must have at least {self.min} {unit}, got {n}"
        if self.max is not None and n > self.max:
            return f"has {n} {unit}; the limit is {self.max}"
        return None


@dataclass(frozen=True, slots=True)
class Pattern:
    """A str field that must fully match ``regex``; ``what`` says it in words."""

    regex: re.Pattern[str]
    what: str

    def error(self, v: str) -> str | None:
        return None if self.regex.fullmatch(v) else f"must be {self.what}, got {short_repr(v)}"


class PublishSubject:
    """A str field that must be a subject one can publish to (a reply inbox)."""

    def error(self, v: str) -> str | None:
        return None if is_publish_subject(v) else \
            f"must be a subject to publish to (no spaces or wildcards), got {short_repr(v)}"


# -- schema walker ----------------------------------------------------------------------------
class Invalid(Exception):
    """A check failed at ``path`` (segments appended while the error unwinds)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.path: list[str] = []

    def to_error(self, root: str, prefix: str = "") -> WispError:
        where = root
        for seg in self.path:
            where += seg if seg.startswith("[") else f".{seg}"
        return WispError(ErrorCode.BAD_REQUEST, f"{prefix}{where}: {self.message}")


def short_repr(v: Any) -> str:
    """``repr(v)``, cut to 60 characters for an error message."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def type_name(v: Any) -> str:
    """What ``v`` is, in wire terms (``null``, ``map``, ``list``, ``int``, ...)."""
    if v is None:
        return "null"
    if isinstance(v, dict):
        return "map"
    if isinstance(v, list | tuple):
        return "list"
    return type(v).__name__


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _describe(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        return "list"
    if origin is dict:
        return "map"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


Conv = Callable[[Any, bool], Any]  # (value, from_wire) -> value


@functools.cache
def field_names(cls: type) -> frozenset[str]:
    """The fields a map for dataclass ``cls`` may carry."""
    return frozenset(f.name for f in fields(cls) if f.init)


@functools.cache
def required_fields(cls: type) -> frozenset[str]:
    """The fields a map for dataclass ``cls`` must carry (those without a default)."""
    return frozenset(f.name for f in fields(cls)
                     if f.init and f.default is MISSING and f.default_factory is MISSING)


@functools.cache
def converter_for(tp: Any) -> Conv:
    """A checking converter for type hint ``tp``: wire value -> Python (from_wire=True) or
    Python -> msgpack-ready value (from_wire=False). Built once per hint."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _annotated_converter(tp)
    if origin in (Union, types.UnionType):
        return _union_converter(tp)
    if origin is Literal:
        return _literal_converter(get_args(tp))
    if origin is list:
        return _list_converter(get_args(tp)[0])
    if origin is dict:
        key_tp, value_tp = get_args(tp)
        assert key_tp is str, "maps are keyed by str"
        return _dict_converter(value_tp)
    if tp is int:
        return _conv_int
    if tp is float:
        return _conv_float
    if tp is bool:
        return _conv_bool
    if tp is str:
        return _conv_str
    if tp is type(None):
        return _conv_none
    if isinstance(tp, type) and issubclass(tp, Enum):
        return _enum_converter(tp)
    if isinstance(tp, type) and is_dataclass(tp):
        return _dataclass_converter(tp)
    raise TypeError(f"protocol: unsupported type hint {tp!r}")


def _conv_int(v: Any, from_wire: bool) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise Invalid(f"expected int, got {type_name(v)}")
    v = int(v)
    if not INT_MIN <= v <= INT_MAX:
        raise Invalid(f"integer {short_repr(v)} does not fit in 64 bits")
    return v


def _conv_float(v: Any, from_wire: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise Invalid(f"expected float, got {type_name(v)}")
    try:
        v = float(v)
    except OverflowError:
        raise Invalid(f"number {short_repr(v)} is out of range") from None
    if not math.isfinite(v):
        raise Invalid(f"must be a finite number, got {v!r}")
    return v


def _conv_bool(v: Any, from_wire: bool) -> bool:
    if not isinstance(v, bool):
        raise Invalid(f"expected bool, got {type_name(v)}")
    return v


def _conv_str(v: Any, from_wire: bool) -> str:
    if not isinstance(v, str):
        raise Invalid(f"expected str, got {type_name(v)}")
    return v


def _conv_none(v: Any, from_wire: bool) -> None:
    if v is not None:
        raise Invalid(f"expected null, got {type_name(v)}")
    return None


def _annotated_converter(tp: Any) -> Conv:
    base, *marks = get_args(tp)
    inner = converter_for(base)
    pre = tuple(m for m in marks if isinstance(m, Len))
    post = tuple(m for m in marks if not isinstance(m, Len))

    def conv(v: Any, from_wire: bool) -> Any:
        if pre and isinstance(v, list | tuple | str):
            for m in pre:
                if (msg := m.error(v)) is not None:
                    raise Invalid(msg)
        out = inner(v, from_wire)
        for m in post:
            if (msg := m.error(out)) is not None:
                raise Invalid(msg)
        return out

    return conv


def _fast_list_check(item_tp: Any) -> Callable[[Any], bool] | None:
    """A test that accepts, using builtins only, a ``list[item_tp]`` that is certainly valid:
    item_tp a bounded int/float (token ids, probabilities) or a length-bounded list of one
    (sparse rows). Whatever it does not accept takes the element-by-element walk, which names
    the culprit; it never accepts anything that walk would refuse."""
    scalar = _fast_scalar_check(item_tp)
    if scalar is not None:
        return scalar
    if get_origin(item_tp) is not Annotated:
        return None
    row_tp, *marks = get_args(item_tp)
    if get_origin(row_tp) is not list or not all(isinstance(m, Len) for m in marks):
        return None
    inner = _fast_scalar_check(get_args(row_tp)[0])
    if inner is None:
        return None
    min_len = max([0] + [m.min for m in marks])
    max_len = min([INT_MAX] + [m.max for m in marks if m.max is not None])

    def accepts(v: Any) -> bool:
        if type(v) is not list or not v or set(map(type, v)) != {list}:
            return False
        lengths = list(map(len, v))
        return (min_len <= min(lengths) and max(lengths) <= max_len
                and inner(list(itertools.chain.from_iterable(v))))

    return accepts


def _fast_scalar_check(item_tp: Any) -> Callable[[Any], bool] | None:
    if get_origin(item_tp) is not Annotated:
        return None
    base, *marks = get_args(item_tp)
    if base not in (int, float) or not all(isinstance(m, Range) and m.gt is None
                                           for m in marks):
        return None
    big = INT_MAX if base is int else sys.float_info.max  # also keeps out inf (and NaN)
    lo = max([-big] + [m.ge for m in marks if m.ge is not None])
    hi = min([big] + [m.le for m in marks if m.le is not None])
    exact = {base}

    def accepts(v: Any) -> bool:
        # A NaN can hide from min/max but not from the sum.
        if type(v) is not list or not v or set(map(type, v)) != exact:
            return False
        if base is float and not math.isfinite(sum(v)):
            return False
        return lo <= min(v) and max(v) <= hi

    return accepts


def _union_converter(tp: Any) -> Conv:
    args = get_args(tp)
    nullable = type(None) in args
    arms = tuple(converter_for(a) for a in args if a is not type(None))
    described = _describe(tp)

    def conv(v: Any, from_wire: bool) -> Any:
        if v is None:
            if nullable:
                return None
            raise Invalid(f"expected {described}, got null")
        if len(arms) == 1:
            return arms[0](v, from_wire)
        for arm in arms:
            try:
                return arm(v, from_wire)
            except Invalid:
                continue
        raise Invalid(f"expected {described}, got {type_name(v)}")

    return conv


def _literal_converter(allowed: tuple) -> Conv:
    listed = ", ".join(repr(a) for a in allowed)

    def conv(v: Any, from_wire: bool) -> Any:
        if type(v) is str and v in allowed:
            return v
        raise Invalid(f"must be one of {listed}, got {short_repr(v)}")

    return conv


def _list_converter(item_tp: Any) -> Conv:
    item = converter_for(item_tp)
    fast = _fast_list_check(item_tp)

    def conv(v: Any, from_wire: bool) -> list:
        if fast is not None and fast(v):
            return v
        if not isinstance(v, list | tuple):
            raise Invalid(f"expected list, got {type_name(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x, from_wire))
            except Invalid as exc:
                exc.path.insert(0, f"[{i}]")
                raise
        return out

    return conv


def _dict_converter(value_tp: Any) -> Conv:
    value = converter_for(value_tp)

    def conv(v: Any, from_wire: bool) -> dict:
        if not isinstance(v, dict):
            raise Invalid(f"expected map, got {type_name(v)}")
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise Invalid(f"map keys must be str, got {type_name(k)}")
            try:
                out[k] = value(x, from_wire)
            except Invalid as exc:
                exc.path.insert(0, f"[{k!r}]")
                raise
        return out

    return conv


def _enum_converter(enum: type[Enum]) -> Conv:
    values = {e.value: e for e in enum}
    listed = ", ".join(repr(v) for v in values)

    def conv(v: Any, from_wire: bool) -> Any:
        member = v if isinstance(v, enum) else values.get(v) if isinstance(v, str) else None
        if member is None:
            raise Invalid(f"must be one of {listed}, got {short_repr(v)}")
        return member if from_wire else member.value

    return conv


def _dataclass_converter(cls: type) -> Conv:
    hints = get_type_hints(cls, include_extras=True)
    specs = tuple((f.name, converter_for(hints[f.name])) for f in fields(cls) if f.init)
    names = field_names(cls)
    required = required_fields(cls)
    validate = getattr(cls, "validate", None)

    def conv(v: Any, from_wire: bool) -> Any:
        if from_wire:
            if not isinstance(v, dict):
                raise Invalid(f"expected map, got {type_name(v)}")
            if unknown := v.keys() - names:
                raise Invalid(_unknown_fields(unknown, names))
            if missing := required - v.keys():
                raise Invalid("missing required field"
                               f"{'s' if len(missing) > 1 else ''} "
                               + ", ".join(repr(m) for m in sorted(missing)))
            kwargs = {}
            for name, conv_field in specs:
                if name in v:
                    try:
                        kwargs[name] = conv_field(v[name], True)
                    except Invalid as exc:
                        exc.path.insert(0, name)
                        raise
            msg = cls(**kwargs)
            out = msg
        else:
            if not isinstance(v, cls):
                raise Invalid(f"expected {cls.__name__}, got {type_name(v)}")
            msg, out = v, {}
            for name, conv_field in specs:
                try:
                    out[name] = conv_field(getattr(v, name), False)
                except Invalid as exc:
                    exc.path.insert(0, name)
                    raise
        if validate is not None:
            try:
                msg.validate()
            except ValueError as exc:
                raise Invalid(str(exc)) from None
        return out

    return conv


def _unknown_fields(unknown: set, names: frozenset[str]) -> str:
    parts = []
    for key in sorted(unknown, key=str):
        text = repr(key)
        if isinstance(key, str) and (close := difflib.get_close_matches(key, names, n=1)):
            text += f" (did you mean {close[0]!r}?)"
        parts.append(text)
    return f"unknown field{'s' if len(parts) > 1 else ''} " + ", ".join(parts)
