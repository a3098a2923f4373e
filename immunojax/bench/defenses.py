"""Every defense family on one classifier: a registry of builders.

A :class:`ClassifierProblem` is a pre-trained classifier (U), its trunk
features and head, the benign data it must keep and the harmful data (a
set of classes) it should not teach back. Each registered
:class:`Defense` maps its family's native objective onto it and returns
the :class:`Stage` s that train it (``run.fit``-ready: an
:class:`~immunojax.immunizer.Immunizer`, a pure sampler, its data, a step
count):

* ``cond_num`` -- the condition-number regularizers on the trunk's
  features (harmful ``R_ill``, benign ``R_well``), benign cross-entropy as
  the task; claims linear probing;
* ``sophon`` -- SOPHON with the harmful classes as the restricted task and
  the benign set for NTR; claims fine-tuning;
* ``gs_lora`` / ``gs_lora_seq`` -- GS-LoRA forgetting the harmful classes in
  one request / one request per class; claims nothing beyond forgetting;
* ``benign_finetune`` -- a baseline, not a defense: U fine-tuned on the
  benign data alone for as long; whatever a defense does beyond it is its
  own;
* ``imma`` / ``mima`` -- the bilevel immunization with the harmful classes
  pooled / one lower level per class (averaged: on a classifier there is no
  K/V projection for phi*, whose own claim stays with the denoiser
  experiment); claim re-learning by full or LoRA fine-tuning.

Each defense has one knob (a list of values, strongest first) that the
caller sets for matched utility. Registering a name twice is an error.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from immunojax import data, losses, lora, modes
from immunojax.immunizer import Immunizer, supervised
from immunojax.methods import cond_num, gs_lora as gs, imma, sophon as sp

PyTree = Any


class ClassifierProblem(NamedTuple):
  """A classifier to defend.

  Attributes:
    apply: ``apply(params, x) -> logits``.
    features: ``features(params, x) -> (N, D)`` trunk features.
    params: the undefended model (U).
    head: regex(es) naming the head's parameters.
    lora_targets: regexes of the kernels LoRA adapts.
    benign: ``(x, y)`` the data the model must keep.
    harmful: ``(x, y)`` the defender's harmful data.
    harmful_classes: the classes that make the harm.
  """
  apply: Callable
  features: Callable
  params: PyTree
  head: tuple[str, ...]
  lora_targets: tuple[str, ...]
  benign: tuple
  harmful: tuple
  harmful_classes: tuple[int, ...]


class Stage(NamedTuple):
  """One training loop: ``run.fit(name, immunizer, immunizer.init(params,
  key), sample, data, steps, key=key)`` then ``immunizer.params``."""
  name: str
  immunizer: Immunizer
  sample: Callable
  data: PyTree
  steps: int


class Defense(NamedTuple):
  """A registered defense.

  Attributes:
    name, family: the defense and its method family.
    claim: attacker modes it claims to resist (empty: none).
    knob: what its strength is called; ``knobs``: values, strongest first.
    native: the family's own metric (``rir``, ``overhead``, ``acc_f``,
      ``sgr``; ``none`` for the baseline).
    build: ``build(problem, knob, *, steps, batch_size, key) -> [Stage]``.
  """
  name: str
  family: str
  claim: tuple[str, ...]
  knob: str
  knobs: tuple[float, ...]
  native: str
  build: Callable[..., list[Stage]]


DEFENSES: dict[str, Defense] = {}


def defense(name: str, *, family: str, claim: Sequence[str], knob: str,
            knobs: Sequence[float], native: str):
  """Registers a builder as defense ``name``.

  Raises:
    ValueError: ``name`` is registered already.
  """
  def register(build):
    if name in DEFENSES:
      raise ValueError(f"defense {name!r} is registered twice")
    DEFENSES[name] = Defense(name, family, tuple(claim), knob, tuple(knobs),
                             native, build)
    return build
  return register


def _ce(apply):
  return lambda p, b: losses.cross_entropy(apply(p, b[0]), b[1])


@defense("benign_finetune", family="baseline", claim=(), knob="lr",
         knobs=(1e-3,), native="none")
def _benign_finetune(problem, knob, *, steps, batch_size, key):
  imm = supervised(_ce(problem.apply), optax.adam(knob))
  return [Stage("benign_finetune", imm,
                lambda d, t: data.minibatch(key, d, batch_size, t),
                problem.benign, steps)]


def _of(x, y, classes):
  keep = jnp.isin(y, jnp.asarray(classes))
  return x[keep], y[keep]


@defense("cond_num", family="cond_num", claim=("probe",), knob="lambda",
         knobs=(3.0, 1.0, 0.3), native="rir")
def _cond_num(problem, knob, *, steps, batch_size, key):
  imm = cond_num.deep.cond_num(
      features_fn=problem.features, task_loss=_ce(problem.apply),
      lambda_p=knob, lambda_h=knob, optimizer=optax.sgd(0.05, momentum=0.9))

  def sample(d, t):
    benign, harmful = d
    return (data.minibatch(key, benign, batch_size, t),
            data.minibatch(jax.random.fold_in(key, 1), harmful, batch_size,
                           t)[0])
  return [Stage("cond_num", imm, sample, (problem.benign, problem.harmful),
                steps)]


SOPHON_ENVIRONMENTS = (sp.Environment("full", "sgd", 0.1),
                       sp.Environment("reinit_head", "sgd", 0.1),
                       sp.Environment("full", "adam", 1e-3))
SOPHON_INNER = 10


@defense("sophon", family="sophon", claim=("full", "reinit_head"),
         knob="fts_lr", knobs=(3e-3, 1e-3, 3e-4), native="overhead")
def _sophon(problem, knob, *, steps, batch_size, key):
  imm = sp.sophon(apply=problem.apply, environments=SOPHON_ENVIRONMENTS,
                  fts_optimizer=optax.chain(optax.clip_by_global_norm(0.5),
                                            optax.adam(knob)),
                  ntr_optimizer=optax.adam(1.5e-3), head=problem.head)

  def sample(d, t):
    benign, harmful = d
    k = jax.random.fold_in(key, t)
    n = harmful[0].shape[0]
    idx = jax.random.randint(k, (1, SOPHON_INNER, batch_size), 0, n)
    restricted = (harmful[0][idx], harmful[1][idx])
    original = data.minibatch(jax.random.fold_in(key, 1), benign,
                              batch_size, t)
    return {"restricted": restricted,
            "original": jax.tree_util.tree_map(lambda a: a[None], original)}
  return [Stage("sophon", imm, sample, (problem.benign, problem.harmful),
                steps)]


def _gs_stage(problem, name, forget, retain, knob, *, steps, batch_size,
              key):
  forward = lambda p, x, y, k: (problem.apply(p, x), problem.features(p, x))
  config = lora.LoraConfig(r=4, lora_alpha=4.0,
                           target_modules=problem.lora_targets)
  imm = gs.gs_lora(forward, lora_config=config, optimizer=optax.adam(1e-2),
                   alpha=1e-3, beta=knob, bound=10.0)

  def sample(d, t):
    ret, fgt = d
    r = data.minibatch(key, ret, batch_size, t)
    f = data.minibatch(jax.random.fold_in(key, 1), fgt, batch_size, t)
    ones = jnp.ones((batch_size,), jnp.float32)
    return {"retain": (*r, ones), "forget": (*f, ones)}
  return Stage(name, imm, sample, (retain, forget), steps)


@defense("gs_lora", family="gs_lora", claim=(), knob="beta",
         knobs=(1.0, 0.3, 0.1), native="acc_f")
def _gs_lora(problem, knob, *, steps, batch_size, key):
  return [_gs_stage(problem, "gs_lora", problem.harmful, problem.benign, knob,
                    steps=steps, batch_size=batch_size, key=key)]


@defense("gs_lora_seq", family="gs_lora", claim=(), knob="beta",
         knobs=(1.0, 0.3, 0.1), native="acc_f")
def _gs_lora_seq(problem, knob, *, steps, batch_size, key):
  """One request per harmful class; the classes not yet forgotten are
  retained."""
  stages = []
  hx, hy = problem.harmful
  classes = list(problem.harmful_classes)
  for i, c in enumerate(classes):
    later = classes[i + 1:]
    rx, ry = problem.benign
    if later:
      lx, ly = _of(hx, hy, later)
      rx, ry = jnp.concatenate([rx, lx]), jnp.concatenate([ry, ly])
    stages.append(_gs_stage(problem, f"gs_lora_seq_{c}", _of(hx, hy, [c]),
                            (rx, ry), knob, steps=steps,
                            batch_size=batch_size,
                            key=jax.random.fold_in(key, i)))
  return stages


IMMA_INNER = 5
# The bilevel ascent stops at this multiple of chance-level cross-entropy
# (log C): unbounded, maximising one class's loss on a classifier grows
# without limit and trades the benign prior away (MIMA at prior weight 30:
# upper loss 72, benign validation 0.76).
ASCENT_BOUND = 2.0


def _bilevel(problem, name, knob, *, per_class, steps, batch_size, key):
  loss = _ce(problem.apply)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  n_classes = problem.apply(problem.params, problem.benign[0][:1]).shape[-1]
  common = dict(upper=(".*",), lower=modes.full(), inner_lr=0.05,
                optimizer=opt, prior_weight=knob, prior_at="released",
                ascent_bound=ASCENT_BOUND * math.log(n_classes))
  hx, hy = problem.harmful
  if per_class:
    imm = imma.mima(loss, merge=imma.average_merge(), **common)
    groups = [_of(hx, hy, [c]) for c in problem.harmful_classes]
    n = min(g[0].shape[0] for g in groups)
    pools = (jnp.stack([g[0][:n] for g in groups]),
             jnp.stack([g[1][:n] for g in groups]))
  else:
    imm = imma.imma(loss, **common)
    pools = (hx[None], hy[None])

  def sample(d, t):
    benign, (px, py) = d
    k = jax.random.fold_in(key, t)
    c, n = px.shape[0], px.shape[1]
    lower = jax.random.randint(k, (c, IMMA_INNER, batch_size), 0, n)
    upper = jax.random.randint(jax.random.fold_in(k, 1), (c, batch_size), 0,
                               n)
    rows = jnp.arange(c)
    return {"lower": (px[rows[:, None, None], lower],
                      py[rows[:, None, None], lower]),
            "upper": (px[rows[:, None], upper], py[rows[:, None], upper]),
            "prior": data.minibatch(jax.random.fold_in(key, 2), benign,
                                    batch_size, t)}
  return [Stage(name, imm, sample, (problem.benign, pools), steps)]


@defense("imma", family="imma", claim=("full", "lora"), knob="prior_weight",
         knobs=(1.0, 3.0, 10.0, 30.0, 100.0), native="sgr")
def _imma(problem, knob, *, steps, batch_size, key):
  return _bilevel(problem, "imma", knob, per_class=False, steps=steps,
                  batch_size=batch_size, key=key)


@defense("mima", family="imma", claim=("full", "lora"), knob="prior_weight",
         knobs=(1.0, 3.0, 10.0, 30.0, 100.0), native="sgr")
def _mima(problem, knob, *, steps, batch_size, key):
  return _bilevel(problem, "mima", knob, per_class=True, steps=steps,
                  batch_size=batch_size, key=key)
