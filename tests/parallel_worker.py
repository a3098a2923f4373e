"""Checks of immunojax.parallel on 8 simulated CPU devices.

Run by tests/test_parallel.py in a subprocess (the device count must be set
before JAX starts): ``python tests/parallel_worker.py GROUP`` prints one JSON
object of measured differences and facts, which the tests assert on.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from immunojax import attacks, compile_cache, immunizer, lora, modes, parallel, spectral  # noqa: E402

compile_cache.enable()   # the test run's cache (IMMUNOJAX_COMPILE_CACHE)
from immunojax.methods import imma  # noqa: E402
from immunojax.methods import sophon as sp  # noqa: E402


def maxdiff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree_util.tree_leaves(a),
                             jax.tree_util.tree_leaves(b)))


def mlp(seed, d=6, h=8, c=4):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  params = {"body": {"kernel": jax.random.normal(k[0], (d, h)) / np.sqrt(d)},
            "head": {"kernel": jax.random.normal(k[1], (h, c)) / np.sqrt(h)}}
  apply = lambda p, x: jnp.tanh(x @ p["body"]["kernel"]) @ p["head"]["kernel"]
  return params, apply


def xent(apply):
  def loss(p, b):
    x, y = b
    logp = jax.nn.log_softmax(apply(p, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))
  return loss


def data(seed, n, d=6, c=4):
  k = jax.random.split(jax.random.PRNGKey(seed), 2)
  return (jax.random.normal(k[0], (n, d)),
          jax.random.randint(k[1], (n,), 0, c))


def check_data() -> dict:
  out = {"devices": jax.device_count()}
  params, apply = mlp(0)
  imm = immunizer.supervised(xent(apply), optax.adam(0.05))
  batch, key = data(1, 32), jax.random.PRNGKey(2)

  def train(step, state):
    for _ in range(10):
      state, metrics = step(state, batch, key)
    return state, metrics

  ref, m_ref = train(jax.jit(imm.update), imm.init(params, key))
  mesh = parallel.local_mesh(8)
  got, m = train(parallel.data_parallel(imm.update, mesh),
                 imm.init(params, key))
  out["data_parallel_params"] = maxdiff(ref.params, got.params)
  out["data_parallel_loss"] = abs(float(m["loss"]) - float(m_ref["loss"]))
  # a model axis: the head's output units split over 2 devices
  mesh2 = parallel.local_mesh(8, axis_names=("data", "model"), shape=(4, 2))
  got2, _ = train(parallel.data_parallel(
      imm.update, mesh2, param_specs={r"head/kernel": P(None, "model")}),
      imm.init(params, key))
  out["model_axis_params"] = maxdiff(ref.params, got2.params)
  out["model_axis_head_spec"] = str(got2.params["head"]["kernel"].sharding.spec)
  out["model_axis_adam_spec"] = str(
      got2.opt_state[0].mu["head"]["kernel"].sharding.spec)
  # the axis_name hook under shard_map: the same method, per-device code
  named = immunizer.supervised(xent(apply), optax.adam(0.05),
                               axis_name="data")
  got3, _ = train(parallel.per_device(named.update, mesh),
                  named.init(params, key))
  out["shard_map_params"] = maxdiff(ref.params, got3.params)
  # errors name the problem
  try:
    parallel.data_parallel(imm.update, mesh2, param_specs={
        r"body/kernel": P("model", None, None)})(imm.init(params, key),
                                                 batch, key)
  except ValueError as e:
    out["bad_spec_error"] = str(e)
  return out


def check_grid() -> dict:
  out = {}
  mesh = parallel.local_mesh(8)
  smap = parallel.sharded_vmap(mesh)
  f = lambda a, c: jnp.sin(a) * c + jnp.cos(c * a)
  a = jnp.linspace(0.0, 1.0, 5)                 # 5 jobs on 8 devices
  out["vmap_values"] = maxdiff(smap(f, in_axes=(0, None))(a, 2.0),
                               jax.vmap(f, in_axes=(0, None))(a, 2.0))
  g = lambda m: lambda c: jnp.sum(m(f, in_axes=(0, None))(a, c))
  out["vmap_grad"] = abs(float(jax.grad(g(smap))(2.0))
                         - float(jax.grad(g(jax.vmap))(2.0)))
  seq = parallel.sharded_vmap(mesh, local=parallel.sequential_map)
  out["sequential_switch"] = np.asarray(jax.jit(seq(
      lambda i, c: jax.lax.switch(i, [lambda: c, lambda: 2 * c]),
      in_axes=(0, None)))(jnp.array([0, 1, 1, 0, 1]), 3.0)).tolist()

  # the attack harness: 6 attacks over 8 devices
  params, apply = mlp(3)
  x, y = data(4, 64)
  xt, yt = data(5, 32)
  target = attacks.Target(
      loss_fn=xent(apply),
      metric_fn=lambda p: jnp.mean(jnp.argmax(apply(p, xt), -1) == yt),
      train_data=(x, y), head=("head",))
  grid = attacks.grid(optimizers=("sgd", "adam"),
                      learning_rates=(0.01, 0.1, 0.5), batch_sizes=(16,),
                      modes=("full",), steps=(20,))
  ref = attacks.run_attacks(grid, {"p": params}, target, eval_every=10)
  got = attacks.run_attacks(grid, {"p": params}, target, eval_every=10,
                            attack_map=smap)
  out["harness_metric"] = maxdiff(ref.metric["p"], got.metric["p"])
  out["harness_loss"] = maxdiff(ref.final_loss["p"], got.final_loss["p"])
  # ... and with each (target, start) call on a device of its own
  starts = {"p": params, "q": mlp(6)[0]}
  two = {"a": target, "b": target._replace(train_data=data(7, 64))}
  ref = attacks.run_attacks(grid[:2], starts, two, eval_every=10)
  got = attacks.run_attacks(grid[:2], starts, two, eval_every=10,
                            devices=jax.devices()[:3])
  out["spread_metric"] = max(maxdiff(ref[t].metric[s], got[t].metric[s])
                             for t in two for s in starts)
  out["spread_loss"] = max(maxdiff(ref[t].final_loss[s],
                                   got[t].final_loss[s])
                           for t in two for s in starts)
  where = lambda x: jnp.asarray(next(iter(x.devices())).id)
  out["spread_devices"] = [int(d) for d in parallel.spread_calls(
      [(where, (jnp.ones(2),))] * 5, jax.devices()[1:4])]

  # SOPHON: 4 simulated environments per update, spread over devices
  rng = np.random.default_rng(0)
  sp_params = {"body": {"kernel": jnp.asarray(rng.normal(size=(3, 4)))},
               "head": {"kernel": jnp.asarray(rng.normal(size=(4, 3)))}}
  sp_apply = lambda p, x: (jnp.tanh(x @ p["body"]["kernel"])
                           @ p["head"]["kernel"])
  batch = {"restricted": (jnp.asarray(rng.normal(size=(1, 3, 10, 3))),
                          jnp.asarray(rng.integers(0, 3, (1, 3, 10)))),
           "original": (jnp.asarray(rng.normal(size=(1, 10, 3))),
                        jnp.asarray(rng.integers(0, 3, (1, 10))))}
  envs = [sp.Environment("full", "sgd", 0.3), sp.Environment("head", "adam",
                                                              0.01),
          sp.Environment("reinit_head", "sgd", 0.1)]
  key = jax.random.PRNGKey(7)

  def sophon_update(env_map):
    imm = sp.sophon(apply=sp_apply, environments=envs,
                    environments_per_update=4, environment_map=env_map)
    return jax.jit(imm.update)(imm.init(sp_params, key), batch, key)

  (s_ref, m_ref), (s_got, m_got) = (sophon_update(parallel.sequential_map),
                                    sophon_update(seq))
  out["sophon_params"] = maxdiff(s_ref.params, s_got.params)
  out["sophon_environments"] = [np.asarray(m_ref["environment"]).tolist(),
                                np.asarray(m_got["environment"]).tolist()]

  # MIMA: three concepts' adaptations spread over devices
  k = jax.random.split(jax.random.PRNGKey(8), 8)
  m_params = {"attn2": {"to_k": {"kernel": 0.3 * jax.random.normal(
      k[0], (4, 3))}}, "other": {"kernel": 0.3 * jax.random.normal(
          k[1], (3, 3))}}

  def m_loss(p, b):
    xx, c, yy = b
    h = jnp.tanh(c @ p["attn2"]["to_k"]["kernel"]) * xx
    return jnp.mean((h @ p["other"]["kernel"] - yy) ** 2)

  def concepts(i, lead):
    return (jax.random.normal(k[i], lead + (5, 3)),
            jax.random.normal(k[i + 1], lead + (5, 4)),
            jax.random.normal(k[i + 2], lead + (5, 3)))

  m_batch = {"lower": concepts(2, (3, 2)), "upper": concepts(5, (3,)),
             "prior": jax.tree_util.tree_map(lambda a: a[0],
                                             concepts(2, (1,)))}

  def mima_update(concept_map):
    imm = imma.mima(m_loss, merge=imma.average_merge(), upper=(r"attn2/",),
                    lower=modes.full(), inner_lr=0.1,
                    optimizer=optax.sgd(0.1), concept_map=concept_map)
    state, _ = jax.jit(imm.update)(imm.init(m_params, key), m_batch, key)
    return imm.params(state)

  out["mima_params"] = maxdiff(mima_update(jax.vmap), mima_update(smap))
  return out


def check_spectral() -> dict:
  out = {}
  mesh = parallel.local_mesh(8)
  key = jax.random.PRNGKey(0)
  d, h = 64, 128
  k = jax.random.split(key, 4)
  params = {"w1": jax.random.normal(k[0], (d, h)) / np.sqrt(d),
            "w2": jax.random.normal(k[1], (h, 10)) / np.sqrt(h)}
  x = jax.random.normal(k[2], (128, d))
  y = jax.random.randint(k[3], (128,), 0, 10)

  def loss(p, x, y):
    z = jnp.tanh(x @ p["w1"]) @ p["w2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None],
                                         1))

  mv = spectral.hessian_matvec(loss)
  v0 = spectral.random_vector(jax.random.PRNGKey(1), params)
  opts = dict(k=2, tol=1e-9, max_steps=300, basis_size=40)
  ref = spectral.top_eigenvalues(mv, v0, params, x, y, **opts)
  rows = NamedSharding(mesh, P("data"))
  rep = parallel.replicated(mesh)
  xs, ys = jax.device_put(x, rows), jax.device_put(y, rows)
  got = spectral.top_eigenvalues(mv, jax.device_put(v0, rep),
                                 jax.device_put(params, rep), xs, ys, **opts)
  out["eig_reference"] = np.asarray(ref.values).tolist()
  out["eig_data_sharded"] = np.asarray(got.values).tolist()
  out["eig_converged"] = [bool(ref.converged), bool(got.converged)]
  # the Krylov basis follows the start vector's sharding
  full_basis = dict(k=1, tol=1e-9, max_steps=200, basis_size=150)

  def temp_bytes(v):
    solve = jax.jit(lambda v, p, x, y: spectral.top_eigenvalues(
        mv, v, p, x, y, **full_basis))
    compiled = solve.lower(v, jax.device_put(params, rep), xs, ys).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  split = {"w1": jax.device_put(v0["w1"], NamedSharding(mesh, P(None,
                                                                "data"))),
           "w2": jax.device_put(v0["w2"], rep)}
  out["basis_temp_bytes_replicated"] = temp_bytes(jax.device_put(v0, rep))
  out["basis_temp_bytes_sharded"] = temp_bytes(split)
  shard = spectral.top_eigenvalues(mv, split, jax.device_put(params, rep),
                                   xs, ys, **opts)
  out["eig_basis_sharded"] = np.asarray(shard.values).tolist()
  # a Gram over samples split across devices
  feats = jax.random.normal(key, (256, 12))
  out["gram"] = maxdiff(spectral.gram(feats),
                        jax.jit(spectral.gram)(jax.device_put(feats, rows)))
  return out


def check_methods() -> dict:
  """Every method family built with axis_name="data" under per_device on 8
  devices, against the same method built without it on one device: 10
  steps, float64. Keys are ``family/variant``; values the largest
  parameter difference."""
  from immunojax import losses  # noqa: PLC0415
  from immunojax.methods import cond_num, gs_lora  # noqa: PLC0415
  mesh = parallel.local_mesh(8)
  key = jax.random.PRNGKey(3)

  def compare(build, params, batches, batch_spec=None):
    ref_imm, got_imm = build(None), build("data")
    ref_step = jax.jit(ref_imm.update)
    got_step = parallel.per_device(got_imm.update, mesh, batch_spec=batch_spec)
    ref, got = ref_imm.init(params, key), got_imm.init(params, key)
    for t, b in enumerate(batches):
      k = jax.random.fold_in(key, t)
      ref, _ = ref_step(ref, b, k)
      got, _ = got_step(got, b, k)
    moved = maxdiff(ref_imm.params(ref), ref_imm.params(
        ref_imm.init(params, key)))
    return [maxdiff(ref_imm.params(ref), got_imm.params(got)), moved]

  out = {}
  params, apply = mlp(0, d=6, h=5)
  feats = lambda p, x: jnp.tanh(x @ p["body"]["kernel"])
  task = lambda p, b: xent(apply)(p, b)
  steps = [((data(10 + t, 32)), data(40 + t, 32)) for t in range(10)]
  deep_batches = [((xp, yp), xh) for (xp, yp), (xh, _) in steps]
  for name in ("cond_num", "opt_kappa"):   # r_ill_only: cond_num's path
    out[f"cond_num.deep/{name}"] = compare(
        lambda ax, name=name: cond_num.deep.by_name(
            name, features_fn=feats, task_loss=task, lambda_p=0.1,
            lambda_h=0.1, optimizer=optax.sgd(0.05), axis_name=ax),
        params, deep_batches)
  out["cond_num.deep/label_kappa"] = compare(
      lambda ax: cond_num.deep.label_kappa(
          features_fn=feats, task_loss=task, lambda_p=0.1, lambda_h=0.1,
          num_classes=4, optimizer=optax.sgd(0.05), axis_name=ax),
      params, [((xp, yp), (xh, yh)) for (xp, yp), (xh, yh) in steps])
  x_p, x_h = data(50, 64)[0], data(51, 64)[0]
  problem = cond_num.linear_problem(x_p, x_h)
  lin = [(x_p[8 * t:8 * t + 32], jnp.tanh(x_p[8 * t:8 * t + 32, 0]))
         for t in range(4)]
  out["cond_num.linear/cond_num"] = compare(
      lambda ax: cond_num.linear.cond_num(
          problem, lambda_p=0.1, lambda_h=0.1, optimizer=optax.sgd(0.01),
          axis_name=ax), cond_num.init_params(6), lin)

  # SOPHON: restricted (D, K, B, ...) rows split on B, original on B.
  envs = [sp.Environment("full", "adam", 0.01),
          sp.Environment("reinit_head", "sgd", 0.1),
          sp.Environment("head", "momentum", 0.05)]
  def sophon_batch(t):
    xr, yr = data(60 + t, 2 * 3 * 16)
    xo, yo = data(80 + t, 16)
    return {"restricted": (xr.reshape(2, 3, 16, 6), yr.reshape(2, 3, 16)),
            "original": (xo[None], yo[None])}
  sb = [sophon_batch(t) for t in range(10)]
  for order in (True, False):
    out[f"sophon/first_order={order}"] = compare(
        lambda ax, order=order: sp.sophon(
            apply=apply, environments=envs, first_order=order,
            restricted_loss=losses.ice_paper, axis_name=ax),
        params, sb, sp.BATCH_SPEC)

  # GS-LoRA++ and the anchored baseline: padded, weighted rows.
  vit = {"blocks": {"0": {"fc1": {"kernel": jax.random.normal(
      jax.random.PRNGKey(5), (6, 6)) / 3}}},
         "head": {"kernel": jax.random.normal(jax.random.PRNGKey(6), (6, 4))}}
  def forward(p, x, y, k):
    emb = jnp.tanh(x @ p["blocks"]["0"]["fc1"]["kernel"])
    return emb @ p["head"]["kernel"], emb
  def gs_batch(t):
    (xr, yr), (xf, yf) = data(90 + t, 32), data(110 + t, 32)
    w = (jnp.arange(32) % 5 != 0).astype(jnp.float64)   # padding rows
    return {"retain": (xr, yr, w), "forget": (xf, 3 - yf // 3, w[::-1])}
  gb = [gs_batch(t) for t in range(10)]
  protos = jax.random.normal(jax.random.PRNGKey(7), (4, 6))
  cfg = lora.LoraConfig(r=2, lora_alpha=1.0, target_modules=("fc1/kernel",))
  out["gs_lora/gs_lora_pp"] = compare(
      lambda ax: gs_lora.gs_lora(
          forward, lora_config=cfg, optimizer=optax.adam(0.05), alpha=0.01,
          beta=0.2, bound=1.5, prototypes=protos, prototype_weight=0.5,
          prototype_bound=2.0, pull_weight=0.1, axis_name=ax), vit, gb)
  mask = {"blocks": {"0": {"fc1": {"kernel": True}}}, "head": {"kernel": False}}
  out["gs_lora/finetune_forget"] = compare(
      lambda ax: gs_lora.finetune_forget(
          forward, optimizer=optax.adam(0.05), trainable=mask, bound=1.5,
          anchor_weight=0.1, axis_name=ax), vit, gb)

  # IMMA / MIMA: rows of every concept's batches split.
  k = jax.random.split(jax.random.PRNGKey(8), 8)
  m_params = {"attn2": {"to_k": {"kernel": 0.3 * jax.random.normal(
      k[0], (4, 3))}}, "other": {"kernel": 0.3 * jax.random.normal(
          k[1], (3, 3))}}
  def m_loss(p, b):
    xx, c, yy = b
    h = jnp.tanh(c @ p["attn2"]["to_k"]["kernel"]) * xx
    return jnp.mean((h @ p["other"]["kernel"] - yy) ** 2)
  def concepts(t, lead):
    kk = jax.random.split(jax.random.fold_in(k[2], t), 3)
    return (jax.random.normal(kk[0], lead + (16, 3)),
            jax.random.normal(kk[1], lead + (16, 4)),
            jax.random.normal(kk[2], lead + (16, 3)))
  mb = [{"lower": concepts(t, (3, 2)), "upper": concepts(t + 50, (3,)),
         "prior": jax.tree_util.tree_map(lambda a: a[0],
                                         concepts(t + 99, (1,)))}
        for t in range(10)]
  mspec = {"lower": P(None, None, "data"), "upper": P(None, "data"),
           "prior": P("data")}
  for scheme in ("unrolled", "alternating"):
    out[f"imma/mima_{scheme}"] = compare(
        lambda ax, scheme=scheme: imma.mima(
            m_loss, merge=imma.average_merge(), upper=(r"attn2/",),
            lower=modes.full(), inner_lr=0.1, optimizer=optax.adam(0.05),
            scheme=scheme, axis_name=ax), m_params, mb, mspec)
  out["imma/max_ascent"] = compare(
      lambda ax: imma.max_ascent(m_loss, upper=(r"attn2/",),
                                 optimizer=optax.adam(0.05), axis_name=ax),
      m_params, mb, mspec)
  return out


if __name__ == "__main__":
  checks = {"data": check_data, "grid": check_grid,
            "spectral": check_spectral, "methods": check_methods}
  print(json.dumps(checks[sys.argv[1]]()))
