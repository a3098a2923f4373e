"""Attacker optimizers as values: what a fine-tuner may choose.

An :class:`Optimizer` pairs a readable name with how to build the optax
transformation at a learning rate. Wherever the library names an optimizer
(the attack harness's grids, SOPHON's simulated environments, the
experiments' ``--optimizers``) it takes any of:

* a name from :data:`OPTIMIZERS` (``"adam"``, ``"momentum_wd"``, ...);
* a factory ``learning_rate -> optax.GradientTransformation``
  (``optax.lion``, ``lambda lr: optax.chain(optax.clip_by_global_norm(1.0),
  optax.adamw(lr))``);
* a ready ``optax.GradientTransformation``: it keeps its own rate, and a
  grid's learning-rate axis does not apply to it;
* an :class:`Optimizer` (e.g. ``optimizer(optax.lion, name="lion-wd")``).

:func:`optimizer` turns any of these into an :class:`Optimizer`; its name
says what it is (``lion``, ``chain(clip_by_global_norm, adamw)``, or the
``name=`` given), and it is what labels and ``summary.json`` show.

Rates are traced where possible (``optax.inject_hyperparams``), so a grid of
learning rates is one ``vmap`` and a simulated attacker's rate can be
differentiated. A factory whose Python code branches on the rate
(``optax.warmup_cosine_decay_schedule(0.0, lr, ...)`` tests ``peak_value ==
0.0``) cannot take a traced rate: :func:`optimizer` finds this once, by
tracing the factory abstractly, and marks the value ``concrete_rate``; it is
then built with a Python float per rate (the harness compiles one group per
rate for it).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from immunojax import _checks

Factory = Callable[..., optax.GradientTransformation]

OPTIMIZERS: dict[str, Factory] = {
    "sgd": optax.sgd,
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    "nesterov": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9,
                                                nesterov=True),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adadelta": optax.adadelta,
    # SOPHON's evaluation attacker: SGD, momentum 0.9, weight decay 1e-4.
    "momentum_wd": lambda learning_rate: optax.chain(
        optax.add_decayed_weights(1e-4),
        optax.sgd(learning_rate, momentum=0.9)),
}


class Optimizer(NamedTuple):
  """An optimizer as a value.

  Attributes:
    name: what labels and summaries call it.
    factory: ``factory(learning_rate) -> GradientTransformation``, or None
      for a ready transformation.
    transform: the ready transformation (its own rate), or None.
    concrete_rate: the factory needs a Python float rate (it branches on
      it), so rates cannot be traced or vmapped.
    named: ``name`` is a key of :data:`OPTIMIZERS` and ``factory`` its
      entry (built with ``inject_hyperparams`` over the factory's own
      keyword arguments, as the name table always was).

  ``opt(learning_rate)`` builds the transformation; equality and hashing go
  by the factory / transform objects, so two values with one name but
  different code are different optimizers (and compile apart).
  """
  name: str
  factory: Factory | None = None
  transform: optax.GradientTransformation | None = None
  concrete_rate: bool = False
  named: bool = False

  @property
  def takes_rate(self) -> bool:
    """False for a ready transformation (the rate axis does not apply)."""
    return self.transform is None

  def __call__(self, learning_rate=None) -> optax.GradientTransformation:
    """The transformation at ``learning_rate`` (ignored by a ready one).

    Raises:
      ValueError: a rate-taking optimizer without a rate, or a
        ``concrete_rate`` one given a traced rate.
    """
    if self.transform is not None:
      return self.transform
    if learning_rate is None:
      raise ValueError(f"optimizer {self.name!r} needs a learning rate")
    if self.concrete_rate:
      if not _checks.is_concrete(learning_rate):
        raise ValueError(
            f"optimizer {self.name!r} branches on its learning rate in "
            "Python, so the rate cannot be traced (vmapped or "
            "differentiated); pass a Python float, or write the factory "
            "without `if` on the rate")
      return self.factory(float(learning_rate))
    if self.named:
      return optax.inject_hyperparams(self.factory)(
          learning_rate=learning_rate)
    factory = self.factory
    return optax.inject_hyperparams(
        lambda learning_rate: factory(learning_rate))(
            learning_rate=learning_rate)


OptimizerLike = Union[str, Factory, optax.GradientTransformation, Optimizer]


def optimizer(spec: OptimizerLike, *, name: str | None = None) -> Optimizer:
  """Any way of naming an optimizer, as an :class:`Optimizer`.

  Args:
    spec: a name from :data:`OPTIMIZERS`, a factory ``learning_rate ->
      GradientTransformation``, a ready ``GradientTransformation``, or an
      :class:`Optimizer` (returned as is, renamed if ``name`` is given).
    name: the label to use instead of the derived one.

  Raises:
    ValueError: an unknown name, or something that is none of the above.
  """
  if name is not None and (not isinstance(name, str) or not name.strip()):
    raise ValueError(f"optimizer name must be a non-empty string, got "
                     f"{name!r}")
  if isinstance(spec, Optimizer):
    return spec if name is None else spec._replace(name=name)
  if isinstance(spec, str):
    _checks.check_choice(spec, OPTIMIZERS, "optimizer")
    return Optimizer(name or spec, OPTIMIZERS[spec], named=True)
  if _is_transformation(spec):
    return Optimizer(name or transformation_name(spec), transform=spec)
  if callable(spec):
    return Optimizer(name or factory_name(spec), spec,
                     concrete_rate=_needs_concrete_rate(spec))
  raise ValueError(
      f"unknown optimizer {spec!r}: pass a name from {sorted(OPTIMIZERS)}, a "
      "factory learning_rate -> optax.GradientTransformation (e.g. "
      "optax.lion), or a ready optax.GradientTransformation")


def make_optimizer(spec: OptimizerLike, learning_rate
                   ) -> optax.GradientTransformation:
  """``optimizer(spec)(learning_rate)``: the transformation, with a rate that
  may be traced (``optax.inject_hyperparams``) so it can be vmapped and
  differentiated.

  Raises:
    ValueError: ``spec`` is not an optimizer (see :func:`optimizer`).
  """
  return optimizer(spec)(learning_rate)


def _is_transformation(x) -> bool:
  return (isinstance(x, tuple) and hasattr(x, "init") and hasattr(x, "update")
          and callable(x.init) and callable(x.update))


def _needs_concrete_rate(factory: Factory) -> bool:
  """Whether ``factory`` fails on a traced rate (Python control flow on it),
  found by tracing it, its ``init`` and one ``update`` abstractly."""
  def probe(lr):
    params = {"w": jnp.zeros((2,), jnp.float32)}
    t = factory(lr)
    if not _is_transformation(t):
      raise ValueError(f"optimizer factory {factory_name(factory)!r} returned "
                       f"{type(t).__name__}, not an optax "
                       "GradientTransformation")
    u, _ = t.update(params, t.init(params), params)
    return u
  try:
    jax.eval_shape(probe, jnp.float32(1e-3))
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerIntegerConversionError,
          jax.errors.TracerArrayConversionError):
    return True
  except ValueError:
    raise
  except Exception as e:   # noqa: BLE001 -- any failure means "not a factory"
    raise ValueError(f"{factory_name(factory)!r} is not an optimizer factory "
                     f"learning_rate -> optax.GradientTransformation: calling "
                     f"it failed with {type(e).__name__}: {e}") from None
  return False


# --- readable names ---------------------------------------------------------

def factory_name(factory: Callable) -> str:
  """``lion``; ``sgd(momentum=0.9)`` for a partial; for a lambda its body's
  calls, e.g. ``chain(clip_by_global_norm, adamw)``; else ``custom``."""
  if isinstance(factory, functools.partial):
    args = ", ".join([repr(a) for a in factory.args] +
                     [f"{k}={v!r}" for k, v in factory.keywords.items()])
    return f"{factory_name(factory.func)}({args})"
  name = getattr(factory, "__name__", None)
  if name and name != "<lambda>":
    return name
  if name == "<lambda>":
    rendered = _lambda_calls(factory)
    if rendered:
      return rendered
  return "custom"


def _lambda_calls(fn) -> str | None:
  """The call structure of a lambda's body from its source, or None."""
  try:
    source = textwrap.dedent(inspect.getsource(fn))
  except (OSError, TypeError):
    return None
  tree = None
  for candidate in (source, source.strip().rstrip(",")):
    try:
      tree = ast.parse(candidate)
      break
    except SyntaxError:
      continue
  if tree is None:
    return None
  first = fn.__code__.co_firstlineno - inspect.getsourcelines(fn)[1] + 1
  lambdas = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda)
             and n.lineno == first]
  if len(lambdas) != 1:       # several lambdas on one line: ambiguous
    return None
  return _render(lambdas[0].body)


def _render(node) -> str | None:
  if not isinstance(node, ast.Call):
    return None
  func = node.func
  head = func.attr if isinstance(func, ast.Attribute) else getattr(
      func, "id", None)
  if head is None:
    return None
  inner = [r for r in (_render(a) for a in node.args) if r]
  return f"{head}({', '.join(inner)})" if inner else head


def transformation_name(t: optax.GradientTransformation) -> str:
  """A ready transformation's name from the optax functions that built it:
  ``chain(scale_by_adam, scale)`` for ``optax.adam(1e-3)``."""
  update = t.update
  cells = _closure(update)
  if "tx" in cells and _is_transformation(cells["tx"]):   # extra-args wrapper
    return transformation_name(cells["tx"])
  qual = getattr(update, "__qualname__", "")
  head = qual.split(".<locals>")[0] if ".<locals>" in qual else "custom"
  if head == "chain" and "update_fns" in cells:
    parts = [transformation_name(optax.GradientTransformation(None, f))
             for f in cells["update_fns"]]
    return f"chain({', '.join(parts)})"
  if head == "with_extra_args_support" and "tx" in cells:
    return transformation_name(cells["tx"])
  return head


def _closure(fn) -> dict:
  code = getattr(fn, "__code__", None)
  if code is None or not fn.__closure__:
    return {}
  out = {}
  for name, cell in zip(code.co_freevars, fn.__closure__):
    try:
      out[name] = cell.cell_contents
    except ValueError:          # an empty cell
      pass
  return out


def jsonable_name(spec: Any) -> Any:
  """What a summary records for an optimizer spec: its name."""
  return spec if isinstance(spec, str) else optimizer(spec).name
