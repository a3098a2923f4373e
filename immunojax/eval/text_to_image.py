"""A text-to-image world on the bundled digits, for concept erasure and
immunization (IMMA / MIMA at CPU scale).

:class:`DigitTextToImage` holds a tiny text-conditioned denoiser (self- and
cross-attention named like SD's ``to_q/to_k/to_v/to_out``), a frozen random
"text encoder" with one concept token ``<dk>`` per digit, the digits split,
and textual inversion's placeholder tokens. Its methods are the pieces of
the concept protocols: the denoising loss and its noise draws, classifier-
free-guided DDIM samples, the UCE erasure of chosen digits, phi*'s keys, the
immunization and attack rows, the frozen-judge metric and its fixed draws,
and how far an attacker moves the model (:func:`attacker_displacement`).
:func:`attack_concepts` attacks several models through the harness with
every per-concept, joint and phi*-merged attack.

Pure functions of their arguments and the world's fixed arrays; the
experiment (``experiments.mima_digits``) owns training loops and I/O.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from immunojax import attacks, data, diffusion, lora, models, modes, parallel
from immunojax.data import prompts
from immunojax.eval import displacement, generative, merge_attack
from immunojax.methods import imma

KV = (r"attn2/to_[kv]/kernel",)                # the key/value attack, phi*
ATTN = (r"attn[12]/to_(q|k|v|out)/kernel",)    # the LoRA attack's modules
ATTACK_MODES = ("full", "lora", "kv", "ti", "phi_merge")


class DigitTextToImage:
  """The denoiser, the frozen text encoder and the digits split.

  Args (keyword-only):
    patch, dim, context_dim, depth, heads: the denoiser's shape
      (:class:`immunojax.models.ConditionalDenoiser`).
    timesteps: the diffusion schedule's length.
    guidance, sample_steps: classifier-free guidance scale and DDIM steps of
      :meth:`sample`.
    num_concepts: textual inversion's placeholder tokens (one per concept).
    seed: the encoder (``seed + 7``), the denoiser's initialisation and the
      split.
  """

  def __init__(self, *, patch: int, dim: int, context_dim: int, depth: int,
               heads: int, timesteps: int, guidance: float,
               sample_steps: int, num_concepts: int, seed: int):
    self.timesteps, self.guidance = timesteps, guidance
    self.sample_steps, self.context_dim = sample_steps, context_dim
    self.vocab = prompts.digit_vocabulary()
    self.encoder = prompts.text_encoder(self.vocab, dim=context_dim,
                                        seed=seed + 7)
    self.ab = diffusion.schedule(timesteps)
    model = models.ConditionalDenoiser(patch=patch, dim=dim,
                                       context_dim=context_dim, depth=depth,
                                       heads=heads, rngs=nnx.Rngs(seed))
    self.unet_apply, unet = models.functional(model)
    digit_row = self.encoder.table[self.vocab.ids(["digit"])[0]]
    # textual inversion's new tokens, initialised from "digit" (unused by
    # every prompt but the attacker's)
    self.init = {"unet": unet,
                 "placeholder": jnp.tile(digit_row[None], (num_concepts, 1))}
    self.split = data.class_split(list(range(10)), test_fraction=0.2,
                                  seed=seed, relabel=False)
    self.null = jnp.asarray(prompts.null_prompt(self.vocab))

  # ------------------------------------------------------------ the model
  def context(self, params, tokens):
    return prompts.encode(self.encoder, tokens, params["placeholder"])

  def eps_fn(self, params, tokens):
    ctx = self.context(params, tokens)
    return lambda x, t: self.unet_apply(params["unet"], x, t, ctx)

  def loss(self, params, batch):
    """The epsilon-prediction MSE on ``{"x", "tokens", "t", "eps"}``."""
    return diffusion.epsilon_loss(self.eps_fn(params, batch["tokens"]),
                                  batch["x"], batch["t"], batch["eps"],
                                  self.ab)

  def sample(self, params, prompt, noise):
    """DDIM samples ``(S, 64)`` in [-1, 1] for one prompt (CFG)."""
    s = noise.shape[0]
    ctx = self.context(params, jnp.broadcast_to(prompt, (s, prompt.shape[0])))
    null = self.context(params, jnp.broadcast_to(self.null, (s, 3)))
    eps = diffusion.guided(
        lambda x, t, c: self.unet_apply(params["unet"], x, t, c), ctx, null,
        self.guidance)
    return diffusion.ddim_sample(eps, noise, self.ab, steps=self.sample_steps)

  # -------------------------------------------------------------- the data
  def images(self, digit, train=True):
    """One digit's images in [-1, 1] (train or test split)."""
    x, y = ((self.split.x_train, self.split.y_train) if train else
            (self.split.x_test, self.split.y_test))
    return 2.0 * x[y == digit] - 1.0

  def noisy(self, x, tokens, rng):
    """Rows ``{"x", "tokens", "t", "eps"}`` with fresh numpy noise."""
    return {"x": jnp.asarray(x, jnp.float32), "tokens": jnp.asarray(tokens),
            "t": jnp.asarray(rng.integers(0, self.timesteps, len(x)),
                             jnp.int32),
            "eps": jnp.asarray(rng.normal(size=x.shape), jnp.float32)}

  def draw(self, key, x, tokens):
    """The same rows with noise from ``key`` (traced)."""
    kt, ke = jax.random.split(key)
    return {"x": x, "tokens": tokens,
            "t": jax.random.randint(kt, x.shape[:-1], 0, self.timesteps,
                                    jnp.int32),
            "eps": jax.random.normal(ke, x.shape, x.dtype)}

  def pretraining(self, key, *, batch: int, cfg_dropout: float):
    """``(arrays, sample)``: every training image (in [-1, 1]) with its
    digit's prompt, and ``sample(arrays, t)``, step ``t``'s noised
    minibatch of ``batch`` rows, each prompt replaced by the null prompt
    with probability ``cfg_dropout`` (classifier-free guidance's
    training)."""
    x = jnp.asarray(2.0 * self.split.x_train - 1.0)
    tokens = jnp.asarray(np.stack([self.prompt(k)
                                   for k in self.split.y_train]))

    def sample(d, t):
      k = jax.random.fold_in(key, t)
      b = data.minibatch(key, d, batch, t)
      drop = jax.random.bernoulli(jax.random.fold_in(k, 1), cfg_dropout,
                                  (batch, 1))
      toks = jnp.where(drop, self.null[None], b[1])
      return self.draw(jax.random.fold_in(k, 2), b[0], toks)
    return (x, tokens), sample

  def prompt(self, digit):
    """The prompt ``a <dk> digit`` of one digit."""
    return prompts.concept_prompt(self.vocab, int(digit))

  # ------------------------------------------------------ erase and merge
  def concept_rows(self, digits):
    """The concept token's row (position 2) of each digit's prompt."""
    return jnp.stack([prompts.encode(self.encoder, self.prompt(k))[2]
                      for k in digits])

  def erase(self, params, concepts: Sequence[int], **uce_options):
    """UCE on every attn2 key/value kernel: each target's ``<dk>`` row maps
    to the empty token's output; the other digits' rows and the shared
    ``a`` / ``digit`` rows are preserved. ``uce_options``: those of
    :func:`immunojax.methods.imma.uce_kernel` (e.g. ``lam``)."""
    others = [k for k in range(10) if k not in concepts]
    guide = prompts.encode(self.encoder, self.null)[2]
    shared = prompts.encode(self.encoder, prompts.class_prompt(self.vocab))[:2]
    erase_keys = self.concept_rows(concepts)
    keep = jnp.concatenate([self.concept_rows(others), shared])
    unet = imma.erase_concepts(params["unet"], erase_keys,
                               jnp.broadcast_to(guide, erase_keys.shape), keep,
                               **uce_options)
    return {**params, "unet": unet}

  def merge_keys(self, concepts: Sequence[int], *, seed: int,
                 captions: int = 200):
    """phi*'s target keys ``(C, 1, d)`` (each concept's token row) and
    regularisation keys (every row of ``captions`` filler captions drawn at
    ``seed`` and of the non-target prompts)."""
    others = [k for k in range(10) if k not in concepts]
    rows = np.concatenate([
        prompts.filler_captions(self.vocab, captions, seed=seed),
        np.stack([self.prompt(k) for k in others])])
    reg = prompts.encode(self.encoder, rows).reshape(-1, self.context_dim)
    return self.concept_rows(concepts)[:, None, :], reg

  # ------------------------------------------------------------ immunize
  def concept_data(self, digits: Sequence[int], concepts: Sequence[int]):
    """Per-digit training images ``x (C, n, 64)`` (truncated to a common
    count) with their prompts, and the prior set (the digits outside
    ``concepts``, own prompts)."""
    xs = [self.images(k) for k in digits]
    n = min(len(x) for x in xs)
    others = [k for k in range(10) if k not in concepts]
    prior_x = np.concatenate([self.images(k) for k in others])
    prior_tok = np.concatenate([np.tile(self.prompt(k),
                                        (len(self.images(k)), 1))
                                for k in others])
    return {"x": jnp.asarray(np.stack([x[:n] for x in xs]), jnp.float32),
            "tokens": jnp.asarray(np.stack([np.tile(self.prompt(k), (n, 1))
                                            for k in digits])),
            "prior_x": jnp.asarray(prior_x, jnp.float32),
            "prior_tokens": jnp.asarray(prior_tok)}

  def clean_concept_loss(self, params, concepts: Sequence[int], *,
                         seed: int) -> float:
    """The mean over concepts of the denoising loss on each concept's
    training images (fixed draws from ``seed``)."""
    d = self.concept_data(concepts, concepts)
    key = jax.random.PRNGKey(seed)
    loss = jax.jit(lambda p, k, x, t: self.loss(p, self.draw(k, x, t)))
    return float(np.mean([float(loss(params, jax.random.fold_in(key, i),
                                      d["x"][i], d["tokens"][i]))
                          for i in range(len(concepts))]))

  # -------------------------------------------------------------- attack
  def attack_rows(self, concepts: Sequence[int], *, textual_inversion: bool,
                  copies: int, seed: int):
    """Each concept's training rows (``copies`` numpy noise draws of its
    images from ``seed``, truncated to a common count) and the prompt it
    trains (its placeholder token under textual inversion)."""
    rng = np.random.default_rng(seed)
    rows, prompt_rows = [], []
    for i, k in enumerate(concepts):
      p = (prompts.placeholder_prompt(self.vocab, i) if textual_inversion
           else self.prompt(k))
      x = np.tile(self.images(k), (copies, 1))
      rows.append(self.noisy(x, np.tile(p, (len(x), 1)), rng))
      prompt_rows.append(p)
    n = min(len(r["x"]) for r in rows)
    return [jax.tree_util.tree_map(lambda a: a[:n], r) for r in rows], \
        prompt_rows

  def judge_data(self, digits: Sequence[int], prompt_rows=None, *,
                 samples: int, seed: int):
    """The judge metric's fixed draws for ``digits`` sampled from
    ``prompt_rows`` (default: each digit's own prompt)
    (:func:`immunojax.eval.generative.judge_data`)."""
    if prompt_rows is None:
      prompt_rows = [self.prompt(k) for k in digits]
    return generative.judge_data(
        prompt_rows, digits, [self.images(k, train=False) for k in digits],
        samples=samples, num_timesteps=self.timesteps, seed=seed)

  def judge_metric(self, classify, features):
    """``metric(params, ev) -> (C, 3)``: per concept the classifier accuracy
    on samples, the mean cosine of classifier features to held-out real
    images, and the held-out denoising MSE (fixed draws)
    (:func:`immunojax.eval.generative.judge_metric`)."""
    def heldout(params, prompt, ref, t, eps):
      toks = jnp.broadcast_to(prompt, (ref.shape[0], prompt.shape[0]))
      return diffusion.epsilon_loss(self.eps_fn(params, toks), ref, t, eps,
                                    self.ab)
    return generative.judge_metric(sample=self.sample, classify=classify,
                                   features=features, heldout_loss=heldout)


def attacker_displacement(world: DigitTextToImage, params,
                          concepts: Sequence[int], *, lower_optimizer,
                          lower: Sequence[str], inner_steps: int,
                          attack_optimizer, attack_steps: int,
                          batch_size: int, seed: int):
  """How far a simulated attacker (``inner_steps`` of ``lower_optimizer``
  on the parameters matching ``lower``) and an evaluated one
  (``attack_steps`` of ``attack_optimizer`` on every parameter) move
  ``params``, per concept, on the same batches of that concept's images
  (``seed + 60 + i``). Returns (simulated, evaluated) lists."""
  d = world.concept_data(concepts, concepts)
  k = max(attack_steps, inner_steps)
  simulated = jax.jit(lambda p, b: displacement.displacement(
      p, world.loss, lower_optimizer, b, trainable=tuple(lower)))
  evaluated = jax.jit(lambda p, b: displacement.displacement(
      p, world.loss, attack_optimizer, b))
  sim, ev = [], []
  for i in range(len(concepts)):
    kr, kn = jax.random.split(jax.random.PRNGKey(seed + 60 + i))
    rows = jax.random.randint(kr, (k, batch_size), 0, d["x"].shape[1])
    batches = jax.vmap(world.draw)(jax.random.split(kn, k),
                                   d["x"][i][rows], d["tokens"][i][rows])
    sim.append(float(simulated(params, jax.tree_util.tree_map(
        lambda a: a[:inner_steps], batches))))
    ev.append(float(evaluated(params, jax.tree_util.tree_map(
        lambda a: a[:attack_steps], batches))))
  return sim, ev


# ------------------------------------------------------------------ attacks
def attack_targets(world: DigitTextToImage, metric, *,
                   concepts: Sequence[int], textual_inversion: bool,
                   collateral: Sequence[int], lora_rank: int, copies: int,
                   samples: int, seed: int) -> dict[str, attacks.Target]:
  """The harness's named targets for one attack: one per concept (its rows
  from ``seed + 21``) and ``joint`` (as many rows as one concept's, drawn
  evenly from all). A concept's target is scored on that concept and then
  the ``collateral`` digits' own prompts, ``joint`` on every concept and
  then the collateral digits; every prompt keeps its judge draws
  (``seed + 30``) whichever target scores it. Sampling is most of an
  attack's time, so a concept's attack does not sample the other concepts
  (the per-concept targets share one compilation, ``joint`` has its own).
  LoRA targets :data:`ATTN` at rank ``lora_rank``; mode ``kv`` trains
  :data:`KV`, mode ``ti`` the placeholder tokens."""
  rows, prompt_rows = world.attack_rows(concepts,
                                        textual_inversion=textual_inversion,
                                        copies=copies, seed=seed + 21)
  n = len(rows[0]["x"])
  common = attacks.Target(
      loss_fn=world.loss, metric_fn=metric, train_data=None,
      lora_config=lora.LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                  target_modules=ATTN),
      masked_modes={"kv": KV, "ti": ("placeholder",)})
  ev = _attack_judge_data(world, concepts, prompt_rows, collateral,
                          samples=samples, seed=seed)
  c = len(concepts)
  own = lambda i: jax.tree_util.tree_map(
      lambda a: jnp.concatenate([a[i:i + 1], a[c:]]), ev)
  out = {str(k): common._replace(train_data=rows[i], eval_data=own(i))
         for i, k in enumerate(concepts)}
  joint = jax.tree_util.tree_map(
      lambda *a: jnp.stack(a, 1).reshape((-1,) + a[0].shape[1:])[:n], *rows)
  out["joint"] = common._replace(train_data=joint, eval_data=ev)
  return out


def _attack_judge_data(world, concepts, prompt_rows, collateral, *, samples,
                       seed):
  """The concepts' attacked prompts, then the collateral digits' own."""
  return world.judge_data(
      list(concepts) + list(collateral),
      list(prompt_rows) + [world.prompt(k) for k in collateral],
      samples=samples, seed=seed + 30)


def phi_merge_attack(world: DigitTextToImage, metric, starts: Mapping, *,
                     concepts: Sequence[int], collateral: Sequence[int],
                     merge: Callable, learning_rate: float, steps: int,
                     eval_every: int, batch_size: int, copies: int,
                     samples: int, seed: int, devices=None) -> dict:
  """Custom Diffusion's recipe, the attack phi* is for: each concept's
  :data:`KV` adapted alone with Adam (the ``kv`` attack's rows and seed),
  the copies merged by ``merge`` (stacked params -> params) at every
  checkpoint, the merged model scored on every concept and collateral digit
  (:func:`immunojax.eval.merge_attack.merged_attack`). Returns metric arrays
  ``(checkpoints, concepts + collateral, 3)`` per start; ``devices``: the
  starts' calls spread over them (:func:`immunojax.parallel.spread_calls`)."""
  rows, prompt_rows = world.attack_rows(concepts, textual_inversion=False,
                                        copies=copies, seed=seed + 21)
  ev = _attack_judge_data(world, concepts, prompt_rows, collateral,
                          samples=samples, seed=seed)
  train = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *rows)
  run_one = jax.jit(lambda p, d, e: merge_attack.merged_attack(
      p, attacker=modes.masked(KV, name="kv"), loss_fn=world.loss,
      optimizer=optax.adam(learning_rate), train_data=d,
      batch_size=batch_size, steps=steps, eval_every=eval_every, merge=merge,
      metric_fn=lambda q: metric(q, e), seed=seed))
  return dict(zip(starts, parallel.spread_calls(
      [(run_one, (p, train, ev)) for p in starts.values()], devices)))


def attack_concepts(world: DigitTextToImage, metric, starts: Mapping, *,
                    concepts: Sequence[int], attack_modes: Sequence[str],
                    rates: Mapping[str, float], steps: int, eval_every: int,
                    batch_size: int, lora_rank: int, copies: int,
                    samples: int, collateral: Sequence[int], merge: Callable,
                    seed: int, attack_map: Callable = jax.vmap,
                    devices=None, log: Callable[[str], None] = lambda s: None):
  """Every start attacked by every mode of ``attack_modes`` (Adam at
  ``rates[mode]``, ``steps`` steps of ``batch_size``, scored every
  ``eval_every``), per concept and jointly through the harness, and by
  :func:`phi_merge_attack` for ``phi_merge`` (at ``rates["kv"]``, merged by
  ``merge``). ``devices``: every start's and target's attack a call of its
  own, spread over them (one attack per mode, so a sharded ``attack_map``
  would pad it; :func:`immunojax.parallel.spread_calls`).

  Returns:
    ``(out, wall)``: per mode, ``out[mode]`` holds ``scopes`` ->
    ``{scope: {start: (checkpoints, concepts, 3)}}`` (``per_concept``: the
    attack on concept k scored on k; ``joint``; ``merged`` for phi_merge),
    ``collateral`` -> the same scopes' mean collateral-digit accuracy
    ``(checkpoints, concepts)`` / ``(checkpoints,)`` (None without
    collateral digits), ``steps`` and ``diverged`` per start; ``wall[mode]``
    its seconds.
  """
  c = len(concepts)
  has_col = bool(collateral)
  # the collateral digits follow the scored concepts (1 per concept, c joint)
  col = lambda m, first=c: m[:, first:, 0].mean(-1) if has_col else None
  shared = dict(collateral=collateral, copies=copies, samples=samples,
                seed=seed)
  out, wall = {}, {}
  for mode in attack_modes:
    t0 = time.perf_counter()
    scope = " merged" if mode == "phi_merge" else " + joint"
    log(f"  attacking with {mode} ({len(starts)} models, "
        f"{c} concepts{scope})")
    if mode == "phi_merge":
      res = phi_merge_attack(world, metric, starts, concepts=concepts,
                             merge=merge, learning_rate=rates["kv"],
                             steps=steps, eval_every=eval_every,
                             batch_size=batch_size, devices=devices,
                             **shared)
      out[mode] = {"scopes": {"merged": {s: r[:, :c] for s, r in
                                         res.items()}},
                   "collateral": {"merged": {s: col(r) for s, r in
                                             res.items()}},
                   "steps": np.arange(0, steps + 1, eval_every),
                   "diverged": {s: bool(not np.all(np.isfinite(r)))
                                for s, r in res.items()}}
      wall[mode] = time.perf_counter() - t0
      continue
    grid = [attacks.Attack("adam", rates[mode], batch_size, mode, steps,
                           seed=seed)]
    targets = attack_targets(world, metric, concepts=concepts,
                             textual_inversion=mode == "ti",
                             lora_rank=lora_rank, **shared)
    curves = attacks.run_attacks(grid, starts, targets, eval_every=eval_every,
                                 attack_map=attack_map, devices=devices)
    m = {k: {s: cv.metric[s][0] for s in starts} for k, cv in curves.items()}
    # per concept: the attack on concept k, scored on concept k
    per = {s: np.stack([m[str(k)][s][:, 0] for k in concepts], axis=1)
           for s in starts}
    per_col = {s: np.stack([col(m[str(k)][s], 1) for k in concepts], axis=1)
               if has_col else None for s in starts}
    out[mode] = {"scopes": {"per_concept": per,
                            "joint": {s: m["joint"][s][:, :c]
                                      for s in starts}},
                 "collateral": {"per_concept": per_col,
                                "joint": {s: col(m["joint"][s])
                                          for s in starts}},
                 "steps": curves["joint"].steps[next(iter(starts))],
                 "diverged": {s: bool(any(cv.diverged[s][0] for cv in
                                          curves.values())) for s in starts}}
    wall[mode] = time.perf_counter() - t0
  return out, wall
