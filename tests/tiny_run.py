"""The sharded tiny distillation step shared by tests/multidevice_train.py and
tests/multiprocess_train.py (run in subprocesses with several devices or processes).

A 4-layer random teacher of vocabulary 64 and width 32 teaches its every-2nd-layer student; the
state is created in its shardings, the teacher placed in its own, and the step jitted with the
state donated. ``put(tree, shardings)`` places host values (every process holds all of them).
"""

import jax
import numpy as np

from jkd import losses, models, partitioning, train


def put(tree, shardings):
  """Host arrays -> global arrays of ``shardings`` (each process reads its own shards)."""
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x)[idx]),
      tree, shardings)


def tiny_step(mesh, objective, *, grad_accum=1, constrained=False, rows=8):
  """``(state, teacher params, jitted step, batch sharding, global tokens, global labels)``.

  ``constrained``: trace the step inside :func:`jkd.partitioning.activation_sharding` (as the
  engine does), so activations carry the mesh's sharding constraints."""
  tcfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                            num_heads=4, num_kv_heads=2)
  tparams = models.init_params(tcfg, jax.random.key(0))
  scfg, sparams = models.student_from_teacher(tparams, tcfg, every=2)
  obj = losses.build_objective(objective)
  opt, sched = train.make_optimizer({"lr": 1e-2, "warmup_steps": 1}, 10)
  ps = train.shardings_for(jax.eval_shape(lambda: sparams), models.param_axes(scfg), mesh)
  pt = train.shardings_for(jax.eval_shape(lambda: tparams), models.param_axes(tcfg), mesh)
  abstract = jax.eval_shape(lambda p: train.init_state(p, opt, obj), sparams)
  ss = train.state_shardings(abstract, ps, opt, mesh)
  state = jax.jit(lambda p: train.init_state(p, opt, obj), out_shardings=ss)(put(sparams, ps))
  bs = train.batch_sharding(mesh)
  fn = train.make_train_step(student_config=scfg, teacher_config=tcfg, objective=obj,
                             optimizer=opt, schedule=sched, grad_accum=grad_accum)

  def traced(*args):
    if not constrained:
      return fn(*args)
    with partitioning.activation_sharding(mesh, train.DEFAULT_RULES):
      return fn(*args)

  step = jax.jit(traced, in_shardings=(ss, bs, None, pt), out_shardings=(ss, None),
                 donate_argnums=0)
  toks = np.asarray(jax.random.randint(jax.random.key(1), (rows, 16), 0, 64))
  labels = np.roll(toks, -1, 1)
  labels[:, -1] = -100
  return state, put(tparams, pt), step, bs, toks, labels


def three_steps(state, step, batch, tparams) -> list[dict[str, float]]:
  """The per-step metrics of three steps on one batch."""
  out = []
  for _ in range(3):
    state, m = step(state, batch, jax.random.key(2), tparams)
    out.append({k: float(v) for k, v in m.items()})
  return out


def teachers_step(mesh):
  """:func:`tiny_step` with two teachers of different shapes (their own shardings) mixed by a
  learned gate (:mod:`jkd.train.teachers`): ``(state, teachers' params, step, batch sharding,
  tokens, labels)``, traced inside the activation constraints as the engine does."""
  from jkd.train import teachers  # pylint: disable=import-outside-toplevel
  tcfgs = (models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                              num_heads=4, num_kv_heads=2),
           models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=128,
                              num_layers=2, num_heads=4, num_kv_heads=2))
  tparams = [jax.jit(models.init_params, static_argnums=0)(c, jax.random.key(i))
             for i, c in enumerate(tcfgs)]
  scfg, sparams = models.student_from_teacher(tparams[0], tcfgs[0], every=2)
  routing = teachers.Routing("gate", 2)
  obj = losses.build_objective({"generalized_jsd": {"beta": 0.5}, "cross_entropy": 0.1})
  opt, sched = train.make_optimizer({"lr": 1e-2, "warmup_steps": 1}, 10)
  gate = {teachers.GATE: teachers.init_gate(scfg.hidden_size, 2)}
  ps = train.shardings_for(jax.eval_shape(lambda: sparams), models.param_axes(scfg), mesh)
  pt = tuple(train.shardings_for(jax.eval_shape(lambda p=p: p), models.param_axes(c), mesh)
             for p, c in zip(tparams, tcfgs))
  abstract = jax.eval_shape(lambda p, g: train.init_state(p, opt, obj, g), sparams, gate)
  ss = train.state_shardings(abstract, ps, opt, mesh)
  state = jax.jit(lambda p, g: train.init_state(p, opt, obj, g), out_shardings=ss)(
      put(sparams, ps), gate)
  bs = train.batch_sharding(mesh)
  fn = train.make_train_step(student_config=scfg, teacher_config=tcfgs, objective=obj,
                             optimizer=opt, schedule=sched, routing=routing)

  def traced(*args):
    with partitioning.activation_sharding(mesh, train.DEFAULT_RULES):
      return fn(*args)

  step = jax.jit(traced, in_shardings=(ss, bs, None, pt), out_shardings=(ss, None),
                 donate_argnums=0)
  toks = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, 64))
  labels = np.roll(toks, -1, 1)
  labels[:, -1] = -100
  return state, tuple(put(p, s) for p, s in zip(tparams, pt)), step, bs, toks, labels
