"""Typed experiment configs: a frozen dataclass becomes a CLI and a file format.

Precedence, lowest first: dataclass defaults, the experiment's ``--quick``
overrides, ``--config FILE`` (JSON or YAML), explicit command-line options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal

from experiments._errors import UsageError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(text: str) -> bool:
  t = str(text).lower()
  if t in _TRUE:
    return True
  if t in _FALSE:
    return False
  raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _converter(tp):
  """Returns (convert(text_or_value) -> value, metavar) for a field type."""
  origin = typing.get_origin(tp)
  if isinstance(tp, type) and hasattr(tp, "parse"):   # e.g. OptimizerSpec
    return tp.parse, tp.metavar
  if tp is bool:
    return _bool, "BOOL"
  if tp in (int, float, str):
    def conv(v, tp=tp):
      if tp is int and isinstance(v, float) and not v.is_integer():
        raise argparse.ArgumentTypeError(f"expected an int, got {v!r}")
      if tp in (int, float) and isinstance(v, bool):
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}")
      try:
        return tp(v)
      except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(
            f"expected {tp.__name__}, got {v!r}") from e
    return conv, tp.__name__.upper()
  if origin is Literal:
    choices = typing.get_args(tp)
    def conv(v):
      if v not in choices:
        raise argparse.ArgumentTypeError(
            f"expected one of {list(choices)}, got {v!r}")
      return v
    return conv, "{" + ",".join(map(str, choices)) + "}"
  if origin is tuple:
    inner, _ = _converter(typing.get_args(tp)[0])
    def conv(v):
      items = v if isinstance(v, (list, tuple)) else \
          [s for s in str(v).split(",") if s.strip()]
      return tuple(inner(s.strip() if isinstance(s, str) else s)
                   for s in items)
    return conv, "A,B,..."
  if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    inner, meta = _converter(args[0])
    def conv(v):
      if v is None or str(v).lower() in ("none", "null"):
        return None
      return inner(v)
    return conv, meta
  raise TypeError(f"unsupported config field type {tp!r}")


def _fields(config_cls):
  hints = typing.get_type_hints(config_cls)
  return [(f, hints[f.name]) for f in dataclasses.fields(config_cls)]


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls,
                         quick: dict) -> None:
  group = parser.add_argument_group(f"{config_cls.__name__} options")
  for f, tp in _fields(config_cls):
    conv, meta = _converter(tp)
    doc = (f.metadata or {}).get("help", "")
    q = f" (--quick: {quick[f.name]!r})" if f.name in quick else ""
    group.add_argument(_flag(f.name), dest=f.name, type=conv, metavar=meta,
                       default=argparse.SUPPRESS,
                       help=f"{doc} [default: {f.default!r}]{q}".strip())


def load_config_file(path: str | Path) -> dict:
  """A JSON or YAML mapping of options (or a run's own config.json).

  Raises:
    UsageError: missing or unreadable file, malformed JSON/YAML (with the
      line), or not a mapping.
  """

  path = Path(path)
  try:
    text = path.read_text()
  except OSError as e:
    raise UsageError(f"--config file {path}: {e.strerror or e}") from None
  if path.suffix in (".yaml", ".yml"):
    import yaml  # noqa: PLC0415
    try:
      data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
      mark = getattr(e, "problem_mark", None)
      where = f" line {mark.line + 1}" if mark is not None else ""
      raise UsageError(f"--config file {path}{where} is not valid YAML "
                       f"({getattr(e, 'problem', None) or e})") from None
  else:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise UsageError(f"--config file {path} line {e.lineno} is not valid "
                       f"JSON ({e.msg})") from None
  if isinstance(data, dict) and "config" in data and isinstance(
      data["config"], dict):
    data = data["config"]  # accept a run's own config.json
  if not isinstance(data, dict):
    raise UsageError(f"--config file {path} must hold a mapping of options")
  return data


def resolve(config_cls, *, quick: bool, quick_overrides: dict,
            file_values: dict | None, cli_values: dict):
  """Builds the config; raises UsageError naming a bad or unknown option."""

  known = {f.name: tp for f, tp in _fields(config_cls)}
  values: dict[str, Any] = {}
  if quick:
    values.update(quick_overrides)
  for key, raw in (file_values or {}).items():
    if key not in known:
      raise UsageError(f"unknown option {key!r} in --config file; "
                       f"known: {sorted(known)}")
    try:
      values[key] = _converter(known[key])[0](raw)
    except argparse.ArgumentTypeError as e:
      raise UsageError(f"option {key!r} in --config file: {e}") from None
  values.update(cli_values)
  try:
    return config_cls(**values)
  except (TypeError, ValueError) as e:
    raise UsageError(f"invalid configuration: {e}") from None


def as_dict(config) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(config)))


# Options shared by several experiments.
Estimator = Literal["pinv", "official"]


def _import_path(text: str):
  """``module:attr`` or ``module.attr`` -> the object, or None."""
  import importlib  # noqa: PLC0415
  module, sep, attr = text.partition(":")
  if not sep:
    module, _, attr = text.rpartition(".")
  if not module or not attr:
    return None
  try:
    obj = importlib.import_module(module)
    for part in attr.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError, ValueError):
    return None
  return obj


class OptimizerSpec(str):
  """An optimizer on the command line: a name from
  ``immunojax.optimizers.OPTIMIZERS``, or the import path of a factory
  ``learning_rate -> optax.GradientTransformation`` (``optax.lion``,
  ``mypkg.opts:clipped_adamw``)."""

  @classmethod
  def names(cls) -> tuple[str, ...]:
    from immunojax.optimizers import OPTIMIZERS  # noqa: PLC0415
    return tuple(OPTIMIZERS)

  @classmethod
  def parse(cls, value) -> "OptimizerSpec":
    from immunojax import optimizers  # noqa: PLC0415
    text = str(value).strip()
    if text in cls.names():
      return cls(text)
    obj = _import_path(text) if ("." in text or ":" in text) else None
    if obj is None:
      raise argparse.ArgumentTypeError(
          f"expected an optimizer name {list(cls.names())} or the import "
          f"path of a factory lr -> optax.GradientTransformation (e.g. "
          f"optax.lion), got {text!r}")
    try:
      optimizers.optimizer(obj)
    except ValueError as e:
      raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return cls(text)

  def value(self):
    """The name itself, or the imported factory as an ``Optimizer``."""
    from immunojax import optimizers  # noqa: PLC0415
    if self in self.names():
      return str(self)
    return optimizers.optimizer(_import_path(self))


OptimizerSpec.metavar = "{" + ",".join(OptimizerSpec.names()) + ",module.attr}"
Optimizer = OptimizerSpec   # a name or an import path (see OptimizerSpec)


def optimizer_values(specs) -> list:
  """Config optimizer specs as what the harness and SOPHON take."""
  return [OptimizerSpec.parse(s).value() for s in specs]


def estimator_option() -> Any:
  """``estimator: Estimator = estimator_option()``: the kappa estimator the
  method uses inside its regularizers (reports always show both)."""
  return dataclasses.field(default="pinv", metadata={
      "help": "kappa estimator inside the regularizers (reports show both)"})


def normalize_option() -> Any:
  """``normalize: bool = normalize_option()``: unit-norm regularizer
  directions (ours) or the paper's hand-balanced ones."""
  return dataclasses.field(default=True, metadata={
      "help": "unit-norm regularizer directions (ours; the paper balances "
              "them by hand)"})


def require(config, *, positive: tuple[str, ...] = (),
            nonnegative: tuple[str, ...] = (), unit: tuple[str, ...] = (),
            divisible: tuple[tuple[str, str], ...] = ()) -> None:
  """Range checks for a config's ``__post_init__``: each named number (or
  every number of a tuple field) must be > 0 / >= 0 / in [0, 1] (``unit``;
  with ``positive`` too: (0, 1]); a tuple named in ``positive`` must not be
  empty; each ``(a, b)`` in ``divisible``: ``a`` a multiple of ``b``.

  Raises:
    ValueError: naming the option (as its command-line flag) and the value.
  """
  for names, ok, word in ((positive, lambda v: v > 0, "> 0"),
                          (nonnegative, lambda v: v >= 0, ">= 0"),
                          (unit, lambda v: 0 <= v <= 1, "in [0, 1]")):
    for name in names:
      value = getattr(config, name)
      items = value if isinstance(value, tuple) else (value,)
      if not items and names is positive:
        raise ValueError(f"{_flag(name)} needs at least one value")
      for v in items:
        if isinstance(v, (int, float)) and not ok(v):
          raise ValueError(f"{_flag(name)} must be {word}, got {v!r}")
  for a, b in divisible:
    va, vb = getattr(config, a), getattr(config, b)
    if va % vb:
      raise ValueError(f"{_flag(a)} {va} is not divisible by {_flag(b)} {vb}")
