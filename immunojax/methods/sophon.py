"""SOPHON non-fine-tunable learning (Deng et al., IEEE S&P 2024).

One update alternates two modules over the same parameters, each with its own
optimizer state (spec ``sophon.md`` §2):

* **Fine-tuning suppression (FTS).** Simulate an attacker: sample an
  environment (attacker mode, optimizer, learning rate), fine-tune the model
  for ``K`` steps on restricted-domain batches (support part of each batch)
  with :func:`immunojax.modes.adapt`, score the restricted loss (e.g. inverse
  cross-entropy) on the batch's query part after *every* step, and descend
  the mean. First order (as released: the adapted point moves with the
  parameters as the identity) or second order (through the optimizer's
  steps). With several restricted domains, each gets its own simulation and
  the meta-gradients are averaged. The FTS gradient is clipped (global norm).
* **Normal training reinforcement (NTR).** ``ntr_steps`` steps of the
  original-domain loss.
* **Guard.** When the original-domain score (accuracy on a guard set, say)
  falls below its minimum, the whole update is rolled back (params and both
  optimizer states) and the next update goes on: the released code stops
  training for good instead.

Deviations from the released code, each deliberate:
  * the simulated attacker is sampled from declared environments (the
    paper's Phi), not the code's fixed plain SGD at 1e-4; the spec's toy study
    shows the simulation must be at least as strong as the evaluated attacker
    and must cover head-only fine-tuning;
  * the query loss after step ``k`` is scored on the query split of batch
    ``k`` at the adapted point ``theta'_{k+1}``, exactly as released; the
    engine runs one extra (discarded) inner step to expose it;
  * with ``reinit_head`` the fresh head's meta-gradient is routed to the real
    head (the code does this through ``CloneBackward``);
  * the guard rolls back and continues.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from immunojax import _checks, losses, modes, optimizers as _optimizers
from immunojax.immunizer import Immunizer
from immunojax.parallel.collectives import (axis_index, axis_size, pmean,
                                            weighted_mean)
from immunojax.parallel.grid import sequential_map
from immunojax.parallel.mesh import DATA

PyTree = Any
ENV_MODES = ("full", "head", "reinit_head")
# How an update's batch splits over a data-parallel mesh: along the example
# axis of each restricted (D, K, B, ...) and original (steps, B, ...) array.
BATCH_SPEC = {"restricted": PartitionSpec(None, None, DATA),
              "original": PartitionSpec(None, DATA)}


class Environment(NamedTuple):
  """One simulated attacker: mode (``full``, ``head``, ``reinit_head``),
  optimizer (a name from :data:`immunojax.optimizers.OPTIMIZERS` or any
  optimizer value the attack harness takes: a factory ``lr ->
  GradientTransformation``, a ready transformation, an
  :class:`~immunojax.optimizers.Optimizer`) and learning rate (None for a
  ready transformation, which keeps its own)."""
  mode: str
  optimizer: _optimizers.OptimizerLike
  learning_rate: float | None

  @classmethod
  def from_attack(cls, attack) -> "Environment":
    """The environment that simulates an attack-harness
    :class:`~immunojax.attacks.Attack` (its mode, optimizer and rate), so
    the defender trains against exactly the attacker it is scored by."""
    return cls(attack.mode, attack.optimizer, attack.learning_rate)

  def as_dict(self) -> dict:
    """JSON-able: the optimizer by its name."""
    return {**self._asdict(),
            "optimizer": _optimizers.jsonable_name(self.optimizer)}


class Guard(NamedTuple):
  """What the model must keep: ``score(params) >= minimum`` (higher is
  better, e.g. original-domain accuracy on a held-out guard set, or a
  denoiser's negated MSE)."""
  score: Callable[[PyTree], jax.Array]
  minimum: float


def accuracy_guard(apply: Callable, x: jax.Array, y: jax.Array,
                   min_accuracy: float) -> Guard:
  """Roll back when the accuracy of ``apply(params, x)`` on ``y`` falls
  below ``min_accuracy``."""
  return Guard(lambda p: jnp.mean(jnp.argmax(apply(p, x), -1) == y),
               min_accuracy)


class SophonState(NamedTuple):
  params: PyTree
  fts_state: PyTree
  ntr_state: PyTree


def _support_query(x, y, key, num_support):
  perm = jax.random.permutation(key, x.shape[0])
  s, q = perm[:num_support], perm[num_support:]
  return (x[s], y[s]), (x[q], y[q])


def _support_query_masks(key, local_rows, support_fraction, axis_name):
  """The split of :func:`_support_query` over the whole batch spread along
  ``axis_name``, as ``(support, query)`` 0/1 weights of this device's rows
  (the same permutation of the ``local_rows * devices`` global rows)."""
  b = local_rows * axis_size(axis_name)
  num_support = max(1, min(b - 1, int(round(b * support_fraction))))
  rank = jnp.argsort(jax.random.permutation(key, b))   # position in perm
  rows = axis_index(axis_name) * local_rows + jnp.arange(local_rows)
  support = (rank[rows] < num_support).astype(jnp.float32)
  return support, 1.0 - support


def _per_example(loss_fn, out, y):
  """``loss_fn`` (a batch mean) on each example alone: ``(B,)``."""
  return jax.vmap(lambda o, t: loss_fn(o[None], t[None]))(out, y)


def sophon(*, apply: Callable[[PyTree, jax.Array], jax.Array],
           environments: Sequence[Environment],
           restricted_loss: Callable = losses.ice_code,
           inner_loss: Callable = losses.cross_entropy,
           original_loss: Callable = losses.cross_entropy,
           fts_optimizer: optax.GradientTransformation | None = None,
           ntr_optimizer: optax.GradientTransformation | None = None,
           head: str | Sequence[str] = ("head",),
           support_fraction: float = 0.9, ntr_steps: int = 1,
           first_order: bool = True, guard: Guard | None = None,
           remat: bool | str = False,
           axis_name: str | None = None,
           environments_per_update: int = 1,
           environment_map: Callable = sequential_map) -> Immunizer:
  """SOPHON as an :class:`~immunojax.immunizer.Immunizer`.

  ``update(state, batch, key)`` takes ``batch = {"restricted": (x, y),
  "original": (x, y)}`` with restricted arrays of shape ``(D, K, B, ...)``
  (``D`` domains, ``K`` inner steps, batches of ``B``, split
  ``support_fraction`` / rest into support and query) and original arrays of
  shape ``(ntr_steps, B, ...)``. The key samples the environment, the splits
  and any fresh head. Metrics: ``fts_loss``, ``ntr_loss`` and
  ``environment`` (the sampled index; shape ``(N,)`` for
  ``environments_per_update=N > 1``), plus the guard's score.

  Args:
    apply: ``apply(params, x) -> logits`` (or a denoiser's prediction),
      row by row (no statistics across the batch: the second-order path
      runs support and query rows through one call).
    environments: the simulated attackers, one sampled per update.
    restricted_loss: what FTS minimises on the query sets
      (:data:`immunojax.losses.RESTRICTED_LOSSES`).
    inner_loss: the simulated attacker's training loss.
    original_loss: NTR's loss.
    fts_optimizer: default ``clip_by_global_norm(0.5)`` then Adam 9e-4
      (3x the released code's base, spec §7.5).
    ntr_optimizer: default Adam 1.5e-3.
    head: regex(es) naming the head (modes ``head`` / ``reinit_head``).
    support_fraction: share of each restricted batch the attacker trains on.
    ntr_steps: NTR steps per update (``l_NTR``).
    first_order: FOMAML (as released); False differentiates through the
      attacker's optimizer steps.
    guard: a :class:`Guard` (e.g. :func:`accuracy_guard`): an update that
      breaks it is rolled back; None: no guard.
    remat: the simulated fine-tuning's ``remat`` (see
      :func:`immunojax.finetune.finetune`): ``"nested"`` keeps the
      second-order loop's memory near ``sqrt(K)`` carries.
    axis_name: the rows of both batches are spread over this device axis
      (``BATCH_SPEC``): the support/query split is the one-device split of
      the whole batch (as per-row masks), the simulated attacker's and both
      modules' losses are global means and their gradients averaged, so an
      update equals the one-device update. The losses must be batch means
      of per-example terms (every loss in :mod:`immunojax.losses` is).
    environments_per_update: the paper's ``N``: independent simulated
      attacks per FTS update, each sampling its own environment and
      support/query split of the same restricted batch; their
      meta-gradients are averaged (the released code: 1).
    environment_map: how those simulations are mapped:
      :func:`immunojax.parallel.sequential_map` (default: one after another,
      each running only its own environment's branch), or
      ``parallel.sharded_vmap(mesh, local=parallel.sequential_map)`` to
      spread them over devices (same result).
  """
  if not environments:
    raise ValueError("sophon needs at least one simulated Environment")
  env_opts = []
  for env in environments:
    _checks.check_choice(env.mode, ENV_MODES, "environment mode")
    opt = _optimizers.optimizer(env.optimizer)
    if opt.takes_rate and (env.learning_rate is None
                           or not env.learning_rate > 0):
      raise ValueError(f"environment learning rate must be > 0, got "
                       f"{env.learning_rate}")
    env_opts.append(opt)
  if not 0 < support_fraction < 1:
    raise ValueError(f"support_fraction must be in (0, 1), got "
                     f"{support_fraction}")
  ntr_steps = _checks.check_positive_int(ntr_steps, "ntr_steps")
  num_envs = _checks.check_positive_int(environments_per_update,
                                        "environments_per_update")
  fts_opt = fts_optimizer or optax.chain(optax.clip_by_global_norm(0.5),
                                         optax.adam(9e-4))
  ntr_opt = ntr_optimizer or optax.adam(1.5e-3)
  envs = tuple(environments)
  transforms = [opt(env.learning_rate) for env, opt in zip(envs, env_opts)]

  def simulate(env: Environment, opt, params, xs, ys, key):
    """One simulated attack on one domain: ``(mean query loss, its
    first-order meta-gradient or None)``."""
    k = xs.shape[0]
    init_key, split_key = jax.random.split(key)
    split_keys = jax.random.split(split_key, k)
    # Step t trains on support t and scores query t-1 at theta'_t (t >= 1);
    # the update of the last step (t = K) is discarded.
    last = lambda a: jnp.concatenate([a, a[-1:]])
    first = lambda a: jnp.concatenate([a[:1], a])
    weight = (jnp.arange(k + 1) > 0).astype(xs.dtype)
    if axis_name is None:
      b = xs.shape[1]
      num_support = max(1, min(b - 1, int(round(b * support_fraction))))
      split = jax.vmap(lambda x, y, kk: _support_query(x, y, kk, num_support))
      (xs_s, ys_s), (xs_q, ys_q) = split(xs, ys, split_keys)
      batches = (last(xs_s), last(ys_s), None, first(xs_q), first(ys_q),
                 None, weight)
      mean_of = lambda fn, out, y, w: fn(out, y)
    else:
      # Rows are spread over the axis: the split is the one-device split
      # of the whole batch (same permutation), as per-row masks, and the
      # losses are global weighted means of per-example values.
      ws, wq = jax.vmap(lambda kk: _support_query_masks(
          kk, xs.shape[1], support_fraction, axis_name))(split_keys)
      batches = (last(xs), last(ys), last(ws), first(xs), first(ys),
                 first(wq), weight)
      mean_of = lambda fn, out, y, w: weighted_mean(
          _per_example(fn, out, y), w, axis_name)

    def loss(p, batch):
      xs_, ys_, w_s, xq, yq, w_q, step_weight = batch
      query = lambda out: step_weight * mean_of(restricted_loss, out, yq, w_q)
      if first_order:
        # FOMAML: d theta'_t / d theta = I, so the meta-gradient is the sum
        # of the query gradients at the adapted points, taken here (explicit
        # accumulation, no reverse pass through the loop).
        value, g = jax.value_and_grad(lambda q: query(apply(q, xq)))(p)
        aux = {"query": value, "query_grad": g}
        return mean_of(inner_loss, apply(p, xs_), ys_, w_s), aux
      # Second order: support and query rows in one forward pass (one
      # larger matmul per layer instead of two; the query is an output the
      # meta-gradient flows through, not part of the inner gradient).
      n = xs_.shape[0]
      out = apply(p, jnp.concatenate([xs_, xq]))
      return mean_of(inner_loss, out[:n], ys_, w_s), {"query": query(out[n:])}

    mode = modes.from_name(env.mode, head_patterns=head)
    if env.mode == "reinit_head":
      fresh = mode.prepare(params, init_key).trainable
      # The fresh head's value, the real head's gradient (as released).
      start = jax.tree_util.tree_map(
          lambda p, f: p + jax.lax.stop_gradient(f - p), params, fresh)
      mode = modes.full()
    else:
      start = params
    res = modes.adapt(mode, start, loss, opt, batches, key=init_key,
                      first_order=first_order, remat=remat,
                      axis_name=axis_name, check_finite=False)
    value = jnp.sum(res.metrics["query"]) / k
    if not first_order:
      return value, None
    grad = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0) / k,
                                  res.metrics["query_grad"])
    return value, grad

  def fts_value_and_grad(params, restricted, key):
    """Mean query loss over domains, its meta-gradient, the environment."""
    xs, ys = restricted
    keys = jax.random.split(key, xs.shape[0] + 1)

    # Domains one after another (lax.map), not vmapped: a vmapped inner
    # loop runs batched matmuls, which XLA:CPU does not lower to its fast
    # GEMM (second order at K = 50: 5.1x K plain steps vmapped, see
    # benchmarks/bilevel.py for the figure now).
    def on_domains(env, opt, p):
      if first_order:
        values, grads = jax.lax.map(
            lambda a: simulate(env, opt, p, *a), (xs, ys, keys[1:]))
        return jnp.mean(values), jax.tree_util.tree_map(
            lambda g: jnp.mean(g, axis=0), grads)
      mean_loss = lambda q: jnp.mean(jax.lax.map(
          lambda a: simulate(env, opt, q, *a)[0], (xs, ys, keys[1:])))
      return jax.value_and_grad(mean_loss)(p)

    branches = [lambda p, env=env, opt=opt: on_domains(env, opt, p)
                for env, opt in zip(envs, transforms)]
    index = jax.random.randint(keys[0], (), 0, len(envs))
    value, grad = jax.lax.switch(index, branches, params)
    return value, grad, index

  def fts_mean(params, restricted, key):
    """:func:`fts_value_and_grad` averaged over ``num_envs`` simulations."""
    if num_envs == 1:
      return fts_value_and_grad(params, restricted, key)
    values, grads, indices = environment_map(
        fts_value_and_grad, in_axes=(None, None, 0))(
            params, restricted, jax.random.split(key, num_envs))
    return (jnp.mean(values), jax.tree_util.tree_map(
        lambda g: jnp.mean(g, axis=0), grads), indices)

  def init(params, key):
    del key
    return SophonState(params, fts_opt.init(params), ntr_opt.init(params))

  def update(state, batch, key):
    fts, g, env_index = fts_mean(state.params, batch["restricted"], key)
    g = pmean(g, axis_name)
    u, fts_state = fts_opt.update(g, state.fts_state, state.params)
    params = optax.apply_updates(state.params, u)

    def ntr_step(carry, b):
      p, s = carry
      value, gn = pmean(jax.value_and_grad(
          lambda q: original_loss(apply(q, b[0]), b[1]))(p), axis_name)
      un, s = ntr_opt.update(gn, s, p)
      return (optax.apply_updates(p, un), s), value

    (params, ntr_state), ntr_losses = jax.lax.scan(
        ntr_step, (params, state.ntr_state), batch["original"])
    new = SophonState(params, fts_state, ntr_state)
    metrics = {"fts_loss": fts, "ntr_loss": ntr_losses[-1],
               "environment": env_index}
    if guard is not None:
      score = guard.score(params)
      keep = score >= guard.minimum
      new = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), new,
                                   state)
      metrics.update(guard_score=score, rolled_back=(~keep).astype(jnp.int32))
    return new, metrics

  return Immunizer(init, update, lambda state: state.params)
