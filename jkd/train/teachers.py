r"""Several teachers in one run: each example taught by a routed mixture of frozen teachers.

The engine holds ``N`` frozen teachers. Teacher 0 is the ``teacher`` section (it also gives the
tokenizer, the weights of a ``layers``/``prune`` student, and the teacher of the data sources that
score with one: DDK, MiniPLM, Distillation-DPO rounds); teachers ``1 .. N-1`` are the model specs
of ``teachers.specs``, each with its own compute and parameter dtype and its own shardings. Every
teacher runs on the whole batch inside the step, and example ``b`` is taught by the mixture

.. math:: \log p_b(v \mid x_{<t}) = \log \sum_i w_{b,i}\, p_i(v \mid x_{<t}),

formed in log space (``logaddexp`` over the teachers of ``log w + log_softmax(z_i)``; a zero weight
contributes ``-inf``, never ``log 0`` of a traced value) and handed to the objective as
``teacher_logits`` (log-probabilities are logits), so every divergence term applies unchanged;
a temperature ``T`` then tempers the mixture. ``teachers.routing`` chooses ``w``:

``field``  ``w_b = onehot(batch[field][b])``: the data names each example's teacher (an int32
           ``[B]`` field, e.g. ``domain`` from ``data.source=domains``); the mixture is then exactly
           the routed teacher's distribution.
``fixed``  ``w_b = weights / sum(weights)`` for every example (``teachers.weights``; "" uniform).
``gate``   a learned instance-level router (MST-Distill's routing network, adapted to language
           models): ``w_b = softmax(W^T h_b + c)``, ``h_b`` the student's final hidden state
           averaged over the example's counted positions under stop-gradient, ``W = 0, c = 0`` at
           the start (uniform). The gate is fitted to the mixture's likelihood of the labels,
           ``L_gate = mean_{b,t} -log sum_i w_{b,i} p_i(y_{b,t})`` (teachers and features under
           stop-gradient), plus ``teachers.balance`` times MST-Distill's load-balancing term
           ``KL(u || mean_b w_b)`` (``u`` uniform); the divergence terms see ``sg(w)``, so the
           student never pulls the gate towards the teacher it already matches. The gate's
           parameters live in ``TrainState.term_params["teachers_gate"]`` (trained by the run's
           optimizer, checkpointed with the state). MST-Distill's own router reads the student's
           class logits through a 2-layer MLP and picks the top-k teachers; with a vocabulary
           of 50k-150k ids that input (and a ``V x 2V`` layer) does not transfer, so the gate
           reads the student's pooled hidden state, mixes softly, and is fitted to the
           teachers' likelihood of the labels (in the published code the top-k choice passes
           no gradient, and the router learns from the balancing term alone).

Logged every step: ``teachers/share/<i>``, teacher ``i``'s token-weighted share
``sum_b w_{b,i} n_b / sum_b n_b`` (``n_b`` the example's counted tokens); with a gate also
``teachers/gate_nll`` (and ``teachers/balance``). Evaluation reports the mixture's metrics under
the usual names (``eval/teacher_nll``, ``eval/kl_forward``, ...) and each teacher's NLL and share,
``eval/teachers/nll/<i>`` and ``eval/teachers/share/<i>``.

Reference: H. Li, P. Yang, J. Chen, L. Dong, Y. Chen, Q. Wang, *MST-Distill: Mixture of
Specialized Teachers for Cross-Modal Knowledge Distillation*, ACM MM 2025, arXiv:2507.07015.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkd import losses
from jkd import models

Array = jax.Array
PyTree = Any

#: ``teachers.routing`` values.
ROUTINGS = ("field", "fixed", "gate")
#: The key of the gate's parameters in ``TrainState.term_params`` (no loss term may take it).
GATE = "teachers_gate"
#: Teacher inputs that have no meaning for a mixture of teachers (terms needing them are refused).
SINGLE_TEACHER_INPUTS = frozenset({"teacher_hidden", "teacher_head", "teacher_hiddens",
                                   "teacher_attentions"})
#: Where a routing field comes from (for the missing-field error).
FIELD_SOURCES = ("data.source='domains' (synthetic domains, or ddk.path JSONL files whose lines"
                 " carry a 'domain' field; its 'domain' is the domain's index, in"
                 " teachers.domains order when given), data.source='npz' with an [N] integer"
                 " array of that name, or a train_source whose batches carry it")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Routing:
  """How the teachers are combined (see the module docstring).

  Attributes:
    kind: ``"field"``, ``"fixed"`` or ``"gate"``.
    num_teachers: ``N`` (teacher 0 plus ``teachers.specs``).
    field: the batch field of ``field`` routing (int ``[B]``, values in ``[0, N)``).
    weights: ``fixed`` weights, normalised to sum 1.
    balance: weight of the gate's load-balancing term.
  """
  kind: str
  num_teachers: int
  field: str = "domain"
  weights: tuple[float, ...] = ()
  balance: float = 0.0

  def __post_init__(self):
    if self.kind not in ROUTINGS:
      raise ValueError(f"teachers.routing must be one of {list(ROUTINGS)} (got {self.kind!r}).")
    if self.num_teachers < 2:
      raise ValueError(f"several teachers means at least 2 (got {self.num_teachers}).")
    if self.kind == "fixed" and len(self.weights) != self.num_teachers:
      raise ValueError(f"fixed routing needs {self.num_teachers} weights (got"
                       f" {len(self.weights)}).")


def split_specs(text: str) -> list[str]:
  """Comma-separated model specs; commas inside ``{...}`` (a ``random:{json}`` spec) stay.

  >>> split_specs('hf:/a, random:{"vocab_size": 8, "seed": 1},smollm2')
  ['hf:/a', 'random:{"vocab_size": 8, "seed": 1}', 'smollm2']
  """
  out, depth, part = [], 0, []
  for ch in str(text):
    depth += {"{": 1, "[": 1, "}": -1, "]": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      out.append("".join(part).strip())
      part = []
    else:
      part.append(ch)
  out.append("".join(part).strip())
  if out == [""]:
    return []
  if any(not s for s in out):
    raise ValueError(f"teachers.specs {text!r} has an empty entry; list model specs separated"
                     " by commas, e.g. 'hf:/models/code,hf:/models/math'.")
  return out


def _per_teacher(text: str, n: int, key: str) -> list[str]:
  """A comma list of ``n`` entries (``""``: all empty)."""
  items = [s.strip() for s in str(text).split(",")] if str(text).strip() else [""] * n
  if len(items) != n:
    raise ValueError(f"{key} lists {len(items)} entries but teachers.specs names {n} teachers:"
                     f" give one per spec (an empty entry keeps the teacher section's), or ''.")
  for item in items:
    if item and item not in _DTYPES:
      raise ValueError(f"{key}: unknown dtype {item!r}; use one of {list(_DTYPES)}.")
  return items


def extra_teachers(cfg) -> list[tuple[str, str, str]]:
  """``[(model spec, dtype, param_dtype)]`` of teachers ``1 .. N-1`` (``teachers.specs``, with
  ``teachers.dtypes``/``param_dtypes``; an empty entry takes ``teacher.dtype``/``param_dtype``).
  """
  t = cfg.teachers
  specs = split_specs(t.specs)
  dtypes = _per_teacher(t.dtypes, len(specs), "teachers.dtypes")
  param_dtypes = _per_teacher(t.param_dtypes, len(specs), "teachers.param_dtypes")
  return [(s, d or str(cfg.teacher.dtype), p or str(cfg.teacher.param_dtype))
          for s, d, p in zip(specs, dtypes, param_dtypes)]


def _weights(text: str, n: int) -> tuple[float, ...]:
  if not str(text).strip():
    return (1.0 / n,) * n
  try:
    w = [float(x) for x in str(text).split(",")]
  except ValueError:
    raise ValueError(f"teachers.weights {text!r}: give {n} comma-separated numbers, e.g."
                     f" '{','.join(['1'] * n)}'.") from None
  if len(w) != n:
    raise ValueError(f"teachers.weights has {len(w)} entries for {n} teachers (teacher.source"
                     " and teachers.specs): give one weight per teacher.")
  if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
    raise ValueError(f"teachers.weights {w} must be finite, >= 0, with a positive sum.")
  return tuple(x / sum(w) for x in w)


def routing_from_config(cfg) -> Routing | None:
  """The run's :class:`Routing` from its ``teachers`` section (None without the section).

  Raises:
    ValueError: an empty ``teachers.specs``, an unknown routing, weights or balance that do not
      fit the routing, or ``teacher.online=False``; each names the key and the fix.
  """
  if "teachers" not in cfg:
    return None
  t = cfg.teachers
  specs = split_specs(t.specs)
  if not specs:
    raise ValueError("the config has a teachers section but teachers.specs is empty: list the"
                     " second and later teachers' model specs (teacher 0 is teacher.source),"
                     " e.g. --config.teachers.specs=hf:/models/code_teacher.")
  extra_teachers(cfg)  # dtype lists checked here, before any model is read.
  n, kind = 1 + len(specs), str(t.routing)
  if kind not in ROUTINGS:
    raise ValueError(f"teachers.routing must be one of {list(ROUTINGS)} (got {kind!r}).")
  if kind != "fixed" and str(t.weights).strip():
    raise ValueError(f"teachers.weights is for teachers.routing='fixed'; with {kind!r} routing"
                     " set it to ''.")
  balance = float(t.balance)
  if not math.isfinite(balance) or balance < 0 or (balance and kind != "gate"):
    raise ValueError(f"teachers.balance must be a finite number >= 0, and 0 unless"
                     f" teachers.routing='gate' (got {t.balance} with {kind!r}).")
  field = str(t.field)
  if kind == "field" and not field:
    raise ValueError("teachers.routing='field' needs teachers.field, the batch field that names"
                     " each example's teacher (e.g. 'domain').")
  if not cfg.teacher.online:
    raise ValueError("several teachers run inside the train step: set teacher.online=True (an"
                     " offline teacher cache holds one teacher).")
  return Routing(kind=kind, num_teachers=n, field=field,
                 weights=_weights(t.weights, n) if kind == "fixed" else (), balance=balance)


# ---------------------------------------------------------------------------------------------
# Checks at setup and on the host batches.

def check_objective(objective: losses.Objective, routing: Routing) -> None:
  """Every term must find its inputs in the mixture's ``teacher_logits``.

  Raises:
    ValueError: a ``fused=True`` term, a term that needs a single teacher's hidden states,
      head or attention maps, or a term named :data:`GATE`.
  """
  for t in objective.terms:
    if t.name == GATE:
      raise ValueError(f"the loss term name {GATE!r} is reserved for the teachers' gate; rename"
                       " the term.")
    if t.options.get("fused", False):
      raise ValueError(f"loss term {t.name!r} has fused=True, which reads one teacher's hidden"
                       f" states and head; with {routing.num_teachers} teachers the step gives"
                       " the routed mixture's distribution (teacher_logits): set fused=False.")
    needs = t.term.needs
    if needs and not any(not set(alt) & SINGLE_TEACHER_INPUTS for alt in needs):
      options = " or ".join("(" + ", ".join(a) + ")" for a in needs)
      raise ValueError(f"loss term {t.name!r} needs {options}: one teacher's features, which a"
                       f" mixture of {routing.num_teachers} teachers does not have; with several"
                       " teachers use terms on teacher_logits (the divergences, uld).")


def check_vocabularies(vocabs: Sequence[int], student_vocab: int, *, cross_tokenizer: bool,
                       routing: Routing) -> None:
  """The teachers' vocabularies (teacher 0 first) against the student's.

  Raises:
    ValueError: a vocabulary that differs from the student's without a cross-tokenizer term
      (``uld``), or differing teacher vocabularies mixed with weights (``fixed``/``gate``).
  """
  vocabs = [int(v) for v in vocabs]
  if not cross_tokenizer and any(v != student_vocab for v in vocabs):
    raise ValueError(
        f"the teachers' vocabularies {vocabs} (teacher.source, then teachers.specs) must all"
        f" equal the student's ({student_vocab}): their mixture is one distribution over one"
        " vocabulary. Use teachers of the student's tokenizer, or a cross-tokenizer objective"
        " (`uld`) with teachers.routing='field'.")
  if routing.kind == "gate" and any(v != student_vocab for v in vocabs):
    raise ValueError(
        f"teachers.routing='gate' fits the gate to the teachers' likelihood of the labels, which"
        f" needs the student's vocabulary ({student_vocab}) in every teacher (got {vocabs}):"
        " route by teachers.routing='field' instead.")
  if len(set(vocabs)) > 1 and routing.kind != "field":
    raise ValueError(
        f"teachers of different vocabularies {vocabs} cannot be mixed with weights"
        f" (teachers.routing={routing.kind!r}): a weighted sum of distributions over different"
        " vocabularies is no distribution. Route one teacher per example"
        " (teachers.routing='field') or use teachers of one vocabulary.")


def check_batch(batch: Mapping[str, Any], routing: Routing | None, *,
                what: str = "the training data") -> None:
  """Host-side check of a batch's routing field (``field`` routing; else nothing).

  Raises:
    ValueError: the field is missing (naming the data sources that provide it), not an integer
      ``[B]`` array, or holds a value outside ``[0, N)``.
  """
  if routing is None or routing.kind != "field":
    return
  name = routing.field
  if name not in batch:
    raise ValueError(
        f"teachers.routing='field' routes each example to a teacher by its {name!r} field, but"
        f" {what} has no such field (its fields: {sorted(batch)}). It comes with"
        f" {FIELD_SOURCES}. Or route without it: teachers.routing='fixed' or 'gate'.")
  ids = np.asarray(batch[name])
  rows = np.shape(batch["tokens"])[0] if "tokens" in batch else ids.shape[0]
  if ids.ndim != 1 or ids.shape[0] != rows or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"the routing field {name!r} must be an integer [batch] array (one teacher"
                     f" index per example); {what} gives {ids.dtype}{list(ids.shape)}.")
  bad = ids[(ids < 0) | (ids >= routing.num_teachers)]
  if bad.size:
    raise ValueError(f"the routing field {name!r} holds {int(bad[0])}, outside [0,"
                     f" {routing.num_teachers}) for the {routing.num_teachers} teachers"
                     " (teacher.source, then teachers.specs): give as many teachers as the"
                     " data has values, or map the values (teachers.domains for domains).")


# ---------------------------------------------------------------------------------------------
# The math (pure, jit-able).

def _log_weights(weights: Array) -> Array:
  """``log w`` with ``-inf`` for ``w == 0`` (the double where: no ``log 0`` is traced)."""
  w = jnp.asarray(weights, jnp.float32)
  return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def mixture_logprobs(logits: Sequence[Array], weights: Array) -> Array:
  r"""Log-probabilities of the mixture of the teachers' distributions.

  .. math:: \log p(v) = \log \sum_i w_i \,\mathrm{softmax}(z_i)_v

  computed as a ``logaddexp`` over the teachers of ``log w_i + log_softmax(z_i)`` (float32). A
  teacher of a smaller vocabulary is padded with ``-inf`` (probability 0) to the largest.

  Args:
    logits: ``N`` arrays ``[B, T, V_i]``, the teachers' logits.
    weights: ``[B, N]`` (per example) or ``[B, T, N]`` (per position) weights, each row
      summing to 1, zeros allowed.

  Returns:
    ``[B, T, max_i V_i]`` float32 log-probabilities (``-inf`` where every weighted teacher has
    probability 0).

  >>> z = [jnp.log(jnp.array([[[0.5, 0.5]]])), jnp.log(jnp.array([[[0.9, 0.1]]]))]
  >>> [round(float(p), 3) for p in jnp.exp(mixture_logprobs(z, jnp.array([[0.5, 0.5]])))[0, 0]]
  [0.7, 0.3]
  """
  logits = list(logits)
  logw = _log_weights(weights)
  if logw.shape[-1] != len(logits):
    raise ValueError(f"weights have {logw.shape[-1]} columns for {len(logits)} teachers.")
  if logw.ndim == 2:
    logw = logw[:, None, :]
  vocab = max(z.shape[-1] for z in logits)
  out = None
  for i, z in enumerate(logits):
    lp = jax.nn.log_softmax(jnp.asarray(z, jnp.float32), axis=-1)
    if lp.shape[-1] < vocab:
      lp = jnp.pad(lp, [(0, 0)] * (lp.ndim - 1) + [(0, vocab - lp.shape[-1])],
                   constant_values=-jnp.inf)
    term = lp + logw[..., i:i + 1]
    out = term if out is None else jnp.logaddexp(out, term)
  return out


def label_logprobs(logits: Sequence[Array], labels: Array, mask: Array) -> Array:
  """``[B, T, N]``: each teacher's ``log p_i(y)`` of the labels (0 where ``mask`` is False)."""
  safe = jnp.where(mask, labels, 0)
  cols = [jnp.take_along_axis(jax.nn.log_softmax(jnp.asarray(z, jnp.float32), axis=-1),
                              safe[..., None], axis=-1)[..., 0] for z in logits]
  return jnp.where(mask[..., None], jnp.stack(cols, axis=-1), 0.0)


def pooled_features(hidden: Array, mask: Array) -> Array:
  """``[B, H]``: the mean of ``hidden`` ``[B, T, H]`` over each row's counted positions (float32;
  zeros for a row without any)."""
  m = jnp.asarray(mask, jnp.float32)
  total = jnp.einsum("bth,bt->bh", jnp.asarray(hidden, jnp.float32), m)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)[:, None]


def init_gate(hidden_size: int, num_teachers: int) -> dict[str, Array]:
  """The gate's parameters: ``kernel [H, N]`` and ``bias [N]``, zeros (uniform weights)."""
  return {"kernel": jnp.zeros((hidden_size, num_teachers), jnp.float32),
          "bias": jnp.zeros((num_teachers,), jnp.float32)}


def gate_weights(params: Mapping[str, Array], features: Array) -> Array:
  """``softmax(features @ kernel + bias)``: ``[B, H] -> [B, N]``."""
  return jax.nn.softmax(features @ params["kernel"] + params["bias"], axis=-1)


def gate_nll(weights: Array, logprobs: Array, mask: Array) -> Array:
  r"""The mixture's token-mean NLL of the labels, the gate's fitting loss.

  .. math:: L = \mathrm{mean}_{(b,t) \in \mathrm{mask}}\; -\log \sum_i w_{b,i}\, p_i(y_{b,t})

  Args:
    weights: ``[B, N]`` routing weights (differentiated).
    logprobs: ``[B, T, N]`` the teachers' ``log p_i(y)`` (:func:`label_logprobs`).
    mask: ``[B, T]`` counted positions.

  >>> lp = jnp.log(jnp.array([[[0.8, 0.2]]]))           # teacher 0 finds the label likely
  >>> round(float(gate_nll(jnp.array([[0.5, 0.5]]), lp, jnp.array([[True]]))), 4)  # -log 0.5
  0.6931
  """
  mixed = jax.nn.logsumexp(_log_weights(weights)[:, None, :] + logprobs, axis=-1)
  return losses.masked_mean(jnp.where(mask, -mixed, 0.0), mask)


def balance_loss(weights: Array) -> Array:
  r"""MST-Distill's load balancing: :math:`\mathrm{KL}(u \| \bar w)`, ``u`` uniform over the
  ``N`` teachers and :math:`\bar w` the batch mean of ``weights`` ``[B, N]``.

  >>> float(balance_loss(jnp.array([[1.0, 0.0], [0.0, 1.0]])))  # balanced on average
  0.0
  """
  mean = jnp.mean(jnp.asarray(weights, jnp.float32), axis=0)
  n = mean.shape[-1]
  return jnp.sum((jnp.log(1.0 / n) - jnp.log(mean)) / n)


def shares(weights: Array, mask: Array) -> Array:
  """``[N]``: each teacher's token-weighted share ``sum_b w_b n_b / sum_b n_b``.

  >>> shares(jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([[1, 1, 1], [1, 0, 0]])).tolist()
  [0.75, 0.25]
  """
  counts = jnp.sum(jnp.asarray(mask, jnp.float32), axis=1)
  return jnp.einsum("bn,b->n", jnp.asarray(weights, jnp.float32), counts) / jnp.maximum(
      jnp.sum(counts), 1.0)


def route(routing: Routing, batch: Mapping[str, Any], *, rows: int,
          gate_params: Mapping[str, Array] | None = None,
          features: Array | None = None) -> Array:
  """The ``[B, N]`` routing weights of a batch (see the module docstring).

  Raises:
    ValueError: (at trace time) ``field`` routing on a batch without the field, or ``gate``
      routing without the gate's parameters.
  """
  n = routing.num_teachers
  if routing.kind == "field":
    if routing.field not in batch:
      raise ValueError(f"teachers.routing='field': the batch has no {routing.field!r} field"
                       f" (its fields: {sorted(batch)}); it comes with {FIELD_SOURCES}.")
    ids = jnp.asarray(batch[routing.field])
    if ids.ndim != 1:
      raise ValueError(f"the routing field {routing.field!r} must be [batch] (one teacher per"
                       f" example), got shape {ids.shape}.")
    return jax.nn.one_hot(ids, n, dtype=jnp.float32)
  if routing.kind == "fixed":
    return jnp.broadcast_to(jnp.asarray(routing.weights, jnp.float32), (rows, n))
  if gate_params is None:
    raise ValueError(f"teachers.routing='gate' needs the gate's parameters"
                     f" (term_params[{GATE!r}], made by jkd.train.build.term_params).")
  return gate_weights(gate_params, features)


def routed_teacher_inputs(teacher_params: Sequence[PyTree],
                          teacher_configs: Sequence[models.ModelConfig],
                          batch: Mapping[str, Any], *, routing: Routing, student_hidden: Array,
                          mask: Array, student_vocab: int,
                          gate_params: Mapping[str, Array] | None = None
                          ) -> dict[str, Array | None]:
  """Runs every teacher on the batch and routes them.

  Returns:
    ``teacher_logits`` (the mixture's ``[B, T, V]`` log-probabilities, teachers and weights
    under stop-gradient), ``routing_weights`` ``[B, N]`` (differentiable for a gate) and
    ``routing_label_logprobs`` ``[B, T, N]`` (None unless every teacher has the student's
    vocabulary ``student_vocab`` and reads the student's tokens).
  """
  if len(teacher_params) != routing.num_teachers or len(teacher_configs) != len(teacher_params):
    raise ValueError(f"{len(teacher_params)} teacher parameter trees and"
                     f" {len(teacher_configs)} configs for {routing.num_teachers} teachers.")
  tokens = batch.get("teacher_tokens", batch["tokens"])
  common = {} if "teacher_tokens" in batch else dict(
      attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
      segment_ids=batch.get("segment_ids"))
  logits = [jax.lax.stop_gradient(models.apply(p, tokens, config=c, **common).logits)
            for p, c in zip(teacher_params, teacher_configs)]
  features = None
  if routing.kind == "gate":
    features = pooled_features(jax.lax.stop_gradient(student_hidden), mask)
  weights = route(routing, batch, rows=tokens.shape[0], gate_params=gate_params,
                  features=features)
  same_vocab = {z.shape[-1] for z in logits} == {int(student_vocab)}
  return {"teacher_logits": mixture_logprobs(logits, jax.lax.stop_gradient(weights)),
          "routing_weights": weights,
          "routing_label_logprobs": (label_logprobs(logits, batch["labels"], mask)
                                     if same_vocab and "teacher_tokens" not in batch else None)}


def routing_loss(inputs: Mapping[str, Any], routing: Routing, mask: Array
                 ) -> tuple[Array, dict[str, Array]]:
  """``(the gate's loss, 0 for field/fixed routing; the routing metrics)`` of one batch."""
  w = inputs["routing_weights"]
  metrics = {f"teachers/share/{i}": s
             for i, s in enumerate(shares(jax.lax.stop_gradient(w), mask))}
  loss = jnp.zeros((), jnp.float32)
  if routing.kind == "gate":
    if inputs.get("routing_label_logprobs") is None:
      raise ValueError("teachers.routing='gate' needs the teachers' log-probabilities of the"
                       " labels: the teachers must read the student's tokens (no"
                       " teacher_tokens) in the student's vocabulary.")
    nll = gate_nll(w, inputs["routing_label_logprobs"], mask)
    metrics["teachers/gate_nll"] = nll
    loss = loss + nll
    if routing.balance:
      balance = balance_loss(w)
      metrics["teachers/balance"] = balance
      loss = loss + routing.balance * balance
  return loss, metrics


def eval_sums(inputs: Mapping[str, Any], mask: Array) -> dict[str, Array]:
  """Per-teacher sums of one eval batch: ``teachers/nll/<i>`` (when the vocabularies match)
  and ``teachers/share/<i>``, summed over the counted positions (divide by the tokens)."""
  m = jnp.asarray(mask, jnp.float32)
  w = jnp.asarray(inputs["routing_weights"], jnp.float32)
  out = {f"teachers/share/{i}": s for i, s in enumerate(
      jnp.einsum("bn,b->n", w, jnp.sum(m, axis=1)))}
  lp = inputs.get("routing_label_logprobs")
  if lp is not None:
    out.update({f"teachers/nll/{i}": -s for i, s in enumerate(jnp.einsum("btn,bt->n", lp, m))})
  return out
