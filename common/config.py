"""Service configuration: one dataclass per service; every field is settable by flag
(`--field-name`) or environment variable (`WISP_FIELD_NAME`), flag winning, then the default.
`--help` lists each field with its variable and default."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass

C = typing.TypeVar("C")


@dataclass(slots=True)
class BaseConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    http_host: str = "127.0.0.1"
    http_port: int = 0  # health/metrics HTTP port; 0 picks a free one (logged at start)
    log_level: str = "info"
    drain_timeout_s: float = 10.0  # graceful SIGTERM: finish in-flight work for this long


def _env_name(field: str) -> str:
    return "WISP_" + field.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _converter(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _converter(args[0])
    if tp is bool:
        return _parse_bool
    return tp


def load_config(cls: type[C], argv: list[str] | None = None, prog: str | None = None) -> C:
    """Build `cls` from flags, then WISP_* environment variables, then defaults."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"env {_env_name(f.name)} (default: {default!r})")
    args = parser.parse_args(argv)
    values = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is None:
            raw = os.environ.get(_env_name(f.name))
        if raw is None:
            continue
        try:
            values[f.name] = _converter(hints[f.name])(raw)
        except ValueError as exc:
            parser.error(f"--{f.name.replace('_', '-')} / {_env_name(f.name)}: {exc}")
    try:
        return cls(**values)
    except ValueError as exc:  # a config's own __post_init__ checks
        parser.error(str(exc))
