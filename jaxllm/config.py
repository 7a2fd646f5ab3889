"""Experiment configs: load a `get_config()` file, apply `--config.a.b=v` overrides, build dataclasses.

Every key must already exist in the config file, so a typo is an error, never a silent default.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import ml_collections

from jaxllm import JaxllmError

T = TypeVar("T")


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Imports `path` (optionally `path:arg`), calls get_config([arg]) and applies `a.b=v` overrides."""
    path, _, arg = path.partition(":")
    if not os.path.isfile(path):
        raise JaxllmError(f"config file {path!r} not found; pass --config=configs/<name>.py")
    spec = importlib.util.spec_from_file_location(f"jaxllm_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except JaxllmError:
        raise
    except Exception as e:  # a broken config file is the user's to fix: say where
        raise JaxllmError(f"config file {_where(path, e)} failed to load: {_one_line(e)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise JaxllmError(
            f"config file {path!r} has no get_config() function; define one that returns a "
            "ConfigDict (see configs/tiny.py)"
        )
    call = f"get_config({arg!r})" if arg else "get_config()"
    try:
        made = module.get_config(arg) if arg else module.get_config()
    except JaxllmError:
        raise
    except Exception as e:
        raise JaxllmError(f"config file {_where(path, e)}: {call} failed: {_one_line(e)}") from None
    if not isinstance(made, (dict, ml_collections.ConfigDict)):
        raise JaxllmError(f"config file {path!r}: {call} returned {type(made).__name__}; return a ConfigDict")
    cfg = ml_collections.ConfigDict(made)
    for item in overrides:
        apply_override(cfg, item)
    cfg.lock()
    return cfg


def _where(path: str, error: BaseException) -> str:
    """`path` and the line of it where `error` arose (the innermost frame in that file)."""
    line = None
    if isinstance(error, SyntaxError) and error.filename and os.path.abspath(error.filename) == os.path.abspath(path):
        line = error.lineno
    tb = error.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"{path!r}" + (f" line {line}" if line else "")


def _one_line(error: BaseException) -> str:
    text = str(error.msg if isinstance(error, SyntaxError) else error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(_keys(v, prefix + k + "."))
    return out


def _unknown(key: str, cfg: ml_collections.ConfigDict) -> JaxllmError:
    close = difflib.get_close_matches(key, _keys(cfg), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; run `jaxllm config --config=FILE` to list keys"
    return JaxllmError(f"unknown config key {key!r}{hint}")


def parse_value(text: str, current: Any, key: str) -> Any:
    """Parses `text` to the type of the value it replaces."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise JaxllmError(f"config key {key!r} is a bool; got {text!r} (use true or false)")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        if isinstance(current, (list, tuple)):  # bare words: wandb, or tensorboard,wandb, or org/name:train
            return type(current)(part.strip() for part in text.split(",") if part.strip())
        raise JaxllmError(f"config key {key!r} expects {type(current).__name__}; got {text!r}") from None
    if current is None:
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(value)
    if isinstance(current, (list, tuple)) and isinstance(value, (str, int, float)):
        return type(current)([value])
    if type(value) is not type(current):
        raise JaxllmError(f"config key {key!r} expects {type(current).__name__}; got {text!r}")
    return value


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
    if "=" not in item:
        raise JaxllmError(f"config override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
            raise _unknown(key, cfg)
        node = node[p]
    if leaf not in node:
        raise _unknown(key, cfg)
    if isinstance(node[leaf], ml_collections.ConfigDict):
        raise JaxllmError(f"config key {key!r} is a section; set one of its keys, e.g. {key}.<name>=...")
    with node.unlocked():
        node[leaf] = parse_value(text, node[leaf], key)


def build(cls: type[T], section: ml_collections.ConfigDict | dict | None, name: str) -> T:
    """`cls(**section)` with a one-line error naming the unknown or wrongly typed key."""
    values = dict(section.to_dict() if isinstance(section, ml_collections.ConfigDict) else (section or {}))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in values:
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hint = f"; did you mean {name}.{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            raise JaxllmError(f"unknown config key {name}.{k}{hint}")
    for k, v in list(values.items()):
        default = fields[k].default
        if isinstance(default, tuple) and isinstance(v, list):
            values[k] = tuple(v)
        elif isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            values[k] = float(v)
        elif (
            default is not dataclasses.MISSING
            and default is not None
            and v is not None
            and not isinstance(v, type(default))
        ):
            raise JaxllmError(f"config key {name}.{k} expects {type(default).__name__}, got {v!r}")
    return cls(**values)


def defaults(cls: type, only: Sequence[str] = ()) -> dict[str, Any]:
    """The field defaults of the config dataclass `cls` (those named in `only`, if given), in field order:
    what configs/common.py declares, so a default is written once, in the dataclass with its comment."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in only if k not in fields]
    if unknown:
        raise JaxllmError(f"{cls.__name__} has no field {unknown[0]!r}")
    out = {}
    for name in only or fields:
        f = fields[name]
        if f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
        else:
            raise JaxllmError(f"{cls.__name__}.{name} has no default; a config file must set it")
    return out


def check_number(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """A one-line error naming `key` unless `value` is a finite number (an int if `integer`) in the range
    [low, high] (`low_open` / `high_open`: that end excluded). Frozen config dataclasses call it."""
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or isinstance(value, int))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise JaxllmError(f"{key}={value!r} is out of range: use {kind}{' ' if bounds else ''}{' and '.join(bounds)}")


def check_sections(cfg: ml_collections.ConfigDict, allowed: Sequence[str]) -> None:
    for k in cfg.keys():
        if k not in allowed:
            close = difflib.get_close_matches(k, list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid sections: {', '.join(allowed)}"
            raise JaxllmError(f"unknown top-level config key {k!r}{hint}")


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)
