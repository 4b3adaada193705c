"""The train state, the optimizer from a config, and the one jitted train step.

One step serves every objective: distillation with the teacher inside the step (its parameters
a separate, never-donated argument), distillation from a cached sparse teacher in the batch, and
any other term of :func:`jkd.losses.build_objective`. The step is ``(state, batch, rng,
teacher_params) -> (state, metrics)`` with the state donated; a non-finite loss or gradient
skips the update and is counted. With several teachers (``routing``,
:mod:`jkd.train.teachers`) ``teacher_params`` is a tuple, one tree per teacher, and the
objective reads the routed mixture as ``teacher_logits``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jkd import losses
from jkd import models
from jkd.partitioning import constrain
from jkd.train import preference_step
from jkd.train import teachers as teachers_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs, as one pytree (checkpointed whole).

  Attributes:
    step: number of steps taken (applied or skipped).
    params: the student's parameters.
    opt_state: the optimizer's state.
    objective_state: state of stateful loss terms (TAID's schedule).
    nan_streak: consecutive skipped (non-finite) steps.
    skipped: total skipped steps.
    term_params: trainable parameters of loss terms, ``{term name: pytree}`` (the projections
      of ``hidden_state`` between different widths; :meth:`jkd.losses.Objective.init_params`),
      ``{}`` when no term has any. Trained with the student, by the same optimizer.
    term_opt_state: the optimizer's state for ``term_params``.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  objective_state: PyTree
  nan_streak: jax.Array
  skipped: jax.Array
  term_params: PyTree
  term_opt_state: PyTree


def _decay_mask(params: PyTree) -> PyTree:
  """Weight decay on matrices only (not on norms, biases or the embedding)."""
  def keep(path, x):
    names = [getattr(p, "key", "") for p in path]
    return x.ndim >= 2 and "embed" not in names and "norm" not in "".join(map(str, names))
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(opt: Mapping[str, Any], total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with linear warmup + cosine decay and global-norm clipping, from a config dict.

  Keys: ``lr``, ``warmup_steps``, ``end_lr_ratio`` (cosine floor), ``b1``, ``b2``, ``eps``,
  ``weight_decay``, ``clip_norm`` (0 disables).
  """
  lr = float(opt["lr"])
  warmup = int(opt.get("warmup_steps", 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=lr * float(opt.get("end_lr_ratio",
                                                                               0.1)))
  parts = []
  if float(opt.get("clip_norm", 1.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(opt.get("clip_norm", 1.0))))
  parts.append(optax.adamw(schedule, b1=float(opt.get("b1", 0.9)), b2=float(opt.get("b2", 0.95)),
                           eps=float(opt.get("eps", 1e-8)),
                           weight_decay=float(opt.get("weight_decay", 0.0)), mask=_decay_mask))
  return optax.chain(*parts), schedule


def init_state(params: PyTree, optimizer: optax.GradientTransformation,
               objective: losses.Objective, term_params: PyTree | None = None) -> TrainState:
  """A fresh train state (call under ``jax.jit(..., out_shardings=...)`` to create it sharded).

  ``term_params``: the loss terms' trainable parameters (:func:`init_term_params`), if any.
  """
  zero = jnp.zeros((), jnp.int32)
  term_params = {} if term_params is None else term_params
  return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                    objective_state=objective.init_state(), nan_streak=zero, skipped=zero,
                    term_params=term_params, term_opt_state=optimizer.init(term_params))


def _needs(objective: losses.Objective) -> dict[str, bool]:
  """What the models must return, from the keys the terms declare in ``needs``."""
  keys = objective.input_keys
  return {"fused": any(t.options.get("fused", False) for t in objective.terms),
          "hidden_states": bool(keys & {"student_hiddens", "teacher_hiddens"}),
          "attentions": bool(keys & {"student_attentions", "teacher_attentions"})}


def init_term_params(objective: losses.Objective, key: jax.Array, *, params: PyTree,
                     teacher_params: PyTree | None, student_config: models.ModelConfig,
                     teacher_config: models.ModelConfig | None, seq_len: int = 8) -> PyTree:
  """The loss terms' trainable parameters, ``{term name: pytree}``, from the models' shapes.

  The objective's inputs are traced abstractly (``jax.eval_shape``: no model runs) on a
  ``[1, seq_len]`` batch; ``params`` and ``teacher_params`` may be shapes too. Wrap the call in
  ``jax.eval_shape`` for the parameters' shapes alone.
  """
  batch = {k: jax.ShapeDtypeStruct((1, seq_len), jnp.int32) for k in ("tokens", "labels")}
  inputs = jax.eval_shape(
      lambda p, t, b: model_inputs(p, t, b, student_config=student_config,
                                   teacher_config=teacher_config, objective=objective)[0],
      params, teacher_params, batch)
  return objective.init_params(key, inputs)


def model_inputs(params: PyTree, teacher_params: PyTree | None, batch: Mapping[str, Any], *,
                 student_config: models.ModelConfig,
                 teacher_config: models.ModelConfig | None,
                 objective: losses.Objective,
                 routing: teachers_lib.Routing | None = None,
                 gate_params: PyTree | None = None) -> tuple[dict[str, Any], jax.Array]:
  """Runs the student (and the teacher, when given) and gathers the objective's inputs.

  A preference batch (``chosen_tokens``, ...) or a KTO batch (``desirable``) goes to
  :func:`jkd.train.preference_step.preference_inputs`; any other batch is a language-model batch.
  With ``routing`` (several teachers), ``teacher_params`` and ``teacher_config`` are tuples and
  the inputs hold the routed mixture (:func:`jkd.train.teachers.routed_teacher_inputs`, with the
  gate's ``gate_params``) as ``teacher_logits``, plus ``routing_weights`` and
  ``routing_label_logprobs``.
  """
  if preference_step.is_preference_batch(batch):
    if routing is not None:
      raise ValueError("several teachers (the teachers section) distil on language-model"
                       " batches; this is a preference batch: train it with one teacher.")
    return preference_step.preference_inputs(
        params, teacher_params, batch, student_config=student_config,
        teacher_config=teacher_config, objective=objective, fused=_needs(objective)["fused"])
  need = _needs(objective)
  common = dict(attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
                segment_ids=batch.get("segment_ids"))
  s = models.apply(params, batch["tokens"], config=student_config,
                   return_logits=not need["fused"], output_hidden_states=need["hidden_states"],
                   output_attentions=need["attentions"], **common)
  inputs: dict[str, Any] = {
      "labels": batch["labels"], "where": batch.get("loss_mask"),
      "student_logits": s.logits, "student_hidden": s.hidden,
      "student_head": models.output_head(params, student_config),
      "student_hiddens": s.hidden_states, "student_attentions": s.attentions,
      "teacher_topk_ids": batch.get("teacher_topk_ids"),
      "teacher_topk_logprobs": batch.get("teacher_topk_logprobs"),
      "teacher_tail_logprob": batch.get("teacher_tail_logprob"),
      "teacher_index": batch.get("teacher_index"),
  }
  if teacher_params is not None and routing is not None:
    inputs.update(teachers_lib.routed_teacher_inputs(
        teacher_params, teacher_config, batch, routing=routing, student_hidden=s.hidden,
        mask=losses.token_mask(inputs), student_vocab=student_config.vocab_size,
        gate_params=gate_params))
  elif teacher_params is not None:
    t = models.apply(teacher_params, batch.get("teacher_tokens", batch["tokens"]),
                     config=teacher_config,
                     return_logits=not need["fused"], output_hidden_states=need["hidden_states"],
                     output_attentions=need["attentions"],
                     **(common if "teacher_tokens" not in batch else {}))
    t = jax.tree.map(jax.lax.stop_gradient, t)
    inputs.update(teacher_logits=t.logits, teacher_hidden=t.hidden,
                  teacher_head=jax.lax.stop_gradient(models.output_head(teacher_params,
                                                                        teacher_config)),
                  teacher_hiddens=t.hidden_states, teacher_attentions=t.attentions)
  aux = s.aux_loss * student_config.router_aux_loss_coef if student_config.num_experts else 0.0
  return inputs, jnp.asarray(aux, jnp.float32)


def check_teacher_free(objective: losses.Objective, params: PyTree,
                       batch: Mapping[str, Any], *,
                       student_config: models.ModelConfig) -> None:
  """Checks that every term finds its inputs without a teacher in the step
  (``teacher.online=False``): from the student and the batch alone (abstractly, no compute).

  Args:
    objective: the objective.
    params: the student's parameters (or their shapes).
    batch: a batch (or its shapes), e.g. the first one.
    student_config: the student's config.

  Raises:
    ValueError: a term needs the teacher's logits, hidden states or a reference the batch lacks,
      naming the term, what it needs and what the batch provides.
  """
  inputs, _ = jax.eval_shape(
      lambda p, b: model_inputs(p, None, b, student_config=student_config, teacher_config=None,
                                objective=objective), params, dict(batch))
  have = {k for k, v in inputs.items() if v is not None}
  for t in objective.terms:
    if t.term.needs and not any(set(alt) <= have for alt in t.term.needs):
      options = " or ".join("(" + ", ".join(a) + ")" for a in t.term.needs)
      raise ValueError(
          f"teacher.online=False: loss term {t.name!r} needs {options}, but without the"
          f" teacher the step has only {sorted(have)} (batch fields {sorted(batch)}). Train on"
          " an offline teacher cache (teacher_topk_ids/teacher_topk_logprobs/"
          "teacher_tail_logprob, e.g. data.source=tfds on a `python -m jkd.data.teacher_cache`"
          " dataset), give preference batches precomputed reference log-probs, or set"
          " teacher.online=True.")


#: Batch fields named ``metric/<name>`` (``[batch]`` floats) are logged as ``<name>`` (their
#: mean): a batch source reports through them (e.g. ``metric/onpolicy/fraction``).
METRIC_PREFIX = "metric/"


def batch_metrics(batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """``{name: mean}`` of the batch's ``metric/<name>`` fields (see :data:`METRIC_PREFIX`)."""
  return {k[len(METRIC_PREFIX):]: jnp.mean(jnp.asarray(v, jnp.float32))
          for k, v in batch.items() if k.startswith(METRIC_PREFIX)}


def make_train_step(*, student_config: models.ModelConfig,
                    teacher_config: models.ModelConfig | tuple | None,
                    objective: losses.Objective,
                    optimizer: optax.GradientTransformation, schedule: Callable,
                    grad_accum: int = 1,
                    routing: teachers_lib.Routing | None = None) -> Callable:
  """The pure train step ``(state, batch, rng, teacher_params) -> (state, metrics)``.

  ``batch`` holds ``tokens``, ``labels`` (``-100`` where no loss), and optionally
  ``attention_mask``, ``loss_mask``, ``positions``, ``segment_ids`` and a sparse teacher
  (``teacher_topk_ids``, ``teacher_topk_logprobs``), all ``[batch, seq, ...]``; or it is a
  preference batch (chosen/rejected pairs, or KTO: :mod:`jkd.train.preference_step`). Fields
  ``metric/<name>`` (``[batch]`` floats) are logged as ``<name>`` (their mean). With
  ``grad_accum > 1`` the batch is split into that many micro-batches whose gradients are
  averaged: micro-batch ``j`` holds rows ``j, j + grad_accum, ...``, so each device's own rows
  are split (its memory falls) and no rows move between devices. Jit it with
  ``donate_argnums=0``.

  Several teachers (``routing``, :mod:`jkd.train.teachers`): ``teacher_config`` and the step's
  ``teacher_params`` are tuples (one per teacher), the objective reads their routed mixture, a
  gate's parameters are ``state.term_params["teachers_gate"]`` (its fitting loss is added to
  the total; it reaches no student parameter), and the step logs ``teachers/share/<i>`` (and
  ``teachers/gate_nll``).
  """
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1 (got {grad_accum}).")

  def loss_fn(trainable, batch, teacher_params, objective_state):
    params, term_params = trainable
    gate = term_params.get(teachers_lib.GATE) if routing is not None else None
    inputs, aux = model_inputs(params, teacher_params, batch, student_config=student_config,
                               teacher_config=teacher_config, objective=objective,
                               routing=routing, gate_params=gate)
    total, metrics = objective(inputs, objective_state, term_params)
    if routing is not None and teacher_params is not None:
      gate_loss, routing_metrics = teachers_lib.routing_loss(inputs, routing,
                                                             losses.token_mask(inputs))
      total = total + gate_loss
      metrics.update(routing_metrics)
    if student_config.num_experts:
      metrics["loss/moe_aux"] = aux
    metrics["train/tokens"] = preference_step.completion_tokens(batch, inputs)
    metrics.update(batch_metrics(batch))
    return total + aux, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: Mapping[str, Any], rng: jax.Array,
           teacher_params: PyTree | None = None) -> tuple[TrainState, dict]:
    del rng  # The objectives here draw no randomness; the signature is the engine's contract.
    trainable = (state.params, state.term_params)
    if grad_accum == 1:
      (total, metrics), grads = grad_fn(trainable, batch, teacher_params, state.objective_state)
    else:
      # Micro-batch j holds rows j, j + A, j + 2A, ...: each device's own rows split A ways
      # (a device holding a contiguous block of rows keeps its share of every micro-batch).
      micro = jax.tree.map(lambda x: constrain(
          x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]).swapaxes(0, 1),
          (None, "batch") + (None,) * (x.ndim - 1)), batch)

      def body(carry, mb):
        (t, m), g = grad_fn(trainable, mb, teacher_params, state.objective_state)
        # Per-example arrays a stateful term keeps (CRD's memory bank) are stacked, not summed.
        kept = m.pop(losses.STATE_INPUTS, None)
        return jax.tree.map(jnp.add, carry, (t, m, g)), kept

      zeros = jax.eval_shape(lambda: grad_fn(trainable, jax.tree.map(lambda x: x[0], micro),
                                             teacher_params, state.objective_state))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      zeros[0][1].pop(losses.STATE_INPUTS, None)
      (total, metrics, grads), kept = jax.lax.scan(body, (zeros[0][0], zeros[0][1], zeros[1]),
                                                   micro)
      tokens = metrics["train/tokens"]
      total, grads = total / grad_accum, jax.tree.map(lambda g: g / grad_accum, grads)
      metrics = jax.tree.map(lambda m: m / grad_accum, metrics)
      metrics["train/tokens"] = tokens
      if kept is not None:  # [A, n, ...] -> [A * n, ...]: every micro-batch's rows.
        metrics[losses.STATE_INPUTS] = jax.tree.map(
            lambda x: x.reshape((-1,) + x.shape[2:]), kept)
    grads, term_grads = grads
    grad_norm = optax.global_norm(grads)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    term_updates, new_term_opt = optimizer.update(term_grads, state.term_opt_state,
                                                  state.term_params)
    # A finite gradient can still give a non-finite update (e.g. a NaN learning rate): check it.
    bad_loss, bad_grad = ~jnp.isfinite(total), ~jnp.isfinite(grad_norm)
    bad_update = ~jnp.isfinite(optax.global_norm((updates, term_updates)))
    finite = ~(bad_loss | bad_grad | bad_update)
    # What overflowed, for the message of a stopped run: 1 loss, 2 gradient, 4 update.
    nonfinite = (bad_loss.astype(jnp.int32) + 2 * bad_grad.astype(jnp.int32)
                 + 4 * bad_update.astype(jnp.int32))
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa
    new_obj = objective.update_state(state.objective_state, metrics, state.step)
    streak = jnp.where(finite, 0, state.nan_streak + 1)
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state),
                           objective_state=keep(new_obj, state.objective_state),
                           nan_streak=streak, skipped=state.skipped + (~finite).astype(jnp.int32),
                           term_params=keep(optax.apply_updates(state.term_params, term_updates),
                                            state.term_params),
                           term_opt_state=keep(new_term_opt, state.term_opt_state))
    metrics.update({"train/grad_norm": grad_norm, "train/lr": schedule(state.step),
                    "train/skipped": new_state.skipped.astype(jnp.float32),
                    "train/finite": finite.astype(jnp.float32),
                    "train/nonfinite": nonfinite.astype(jnp.float32)})
    metrics.update(objective.state_metrics(state.objective_state))
    return new_state, metrics

  return step


def flops_per_token(config: models.ModelConfig, seq_len: int) -> float:
  """Forward matmul FLOPs per token (2 x params in matmuls + causal attention scores)."""
  h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  d, nh, nkv = config.dim_per_head, config.num_heads, config.num_kv_heads
  attn = h * d * (2 * nh + 2 * nkv)
  mlp = 3 * h * f * (config.num_experts or 1)
  per_layer = 2 * (attn + mlp) + 2 * 2 * nh * d * seq_len / 2  # causal: half the scores
  return config.num_layers * per_layer + 2 * h * v


def _teacher_flops(teacher: models.ModelConfig | tuple | None, seq_len: int) -> float:
  """Forward FLOPs per token of the teacher, or of every teacher (a tuple)."""
  if teacher is None:
    return 0.0
  configs = teacher if isinstance(teacher, tuple) else (teacher,)
  return sum(flops_per_token(c, seq_len) for c in configs)


def step_flops(student: models.ModelConfig, teacher: models.ModelConfig | tuple | None,
               tokens: int, seq_len: int) -> float:
  """Model FLOPs of one train step: student forward+backward (3x), teacher forward (1x; every
  teacher's when ``teacher`` is a tuple)."""
  return (3 * flops_per_token(student, seq_len) + _teacher_flops(teacher, seq_len)) * tokens


def batch_work(batch_shapes: Mapping[str, tuple[int, ...]], student: models.ModelConfig,
               teacher: models.ModelConfig | tuple | None, objective: losses.Objective,
               processes: int = 1) -> tuple[int, float]:
  """``(tokens, model FLOPs)`` of one train step on batches of these per-process shapes.

  Tokens are the student's input tokens (both sequences of a preference pair); FLOPs are the
  student's forward+backward (3x) and the teacher's forward where it runs (a language-model
  batch, or a preference batch whose reference comes from the teacher); every teacher's when
  ``teacher`` is a tuple (several teachers).
  """
  rows, teacher_rows, seq = preference_step.work(batch_shapes, objective)
  tokens = rows * processes * seq
  flops = step_flops(student, None, tokens, seq)
  if teacher is not None and teacher_rows:
    flops += _teacher_flops(teacher, seq) * teacher_rows * processes * seq
  return tokens, flops
