"""Composing a training objective from named loss terms: a registry and a weighted sum.

A config gives the objective as a plain dict; :func:`build_objective` turns it into a pure
function of the model outputs that returns the total and every term as a metric::

    objective = build_objective({
        "kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5},
        "cross_entropy": 0.1,                       # shorthand for {"weight": 0.1}
    })
    total, metrics = objective(inputs)              # metrics["loss/kd"], metrics["loss/total"]

Each entry's key names the term (and its metric); ``"term"`` picks the registered loss when the
key is a custom name, ``"weight"`` (default 1.0) scales it, and every other field is an option of
that loss, checked when the objective is built: a typo is an error naming the valid options.

``inputs`` is a mapping of arrays. The keys a term reads:

=========================  ===================================================================
``student_logits``         ``[B, T, V]`` student logits
``teacher_logits``         ``[B, T, V]`` teacher logits (or the sparse teacher below)
``teacher_topk_ids``       ``[B, T, k]`` offline teacher top-k ids
``teacher_topk_logprobs``  ``[B, T, k]`` their log-probs (optional ``teacher_tail_logprob``)
``labels``                 ``[B, T]`` next-token ids, ``-100`` where no loss is taken
``where``                  ``[B, T]`` bool, positions that count (ANDed with ``labels != -100``)
``student_hidden``         ``[B, T, Hs]`` final hidden states, for ``fused=True`` terms
``student_head``           ``[Hs, V]`` output head, for ``fused=True`` terms
``teacher_hidden``         ``[B, T, Ht]`` and ``teacher_head`` ``[Ht, V]`` likewise
``student_hiddens``        per-layer hidden states (feature terms), ``teacher_hiddens`` likewise
``student_attentions``     per-layer attention maps, ``teacher_attentions`` likewise
``projections``            fixed projection(s) for hidden-state terms (learned ones are the
                           term's own parameters, below)
``teacher_index``          ``[B, T]`` teacher position aligned to each student position (``uld``)
=========================  ===================================================================

Stateful terms (TAID, CRD's memory bank) keep their state in ``objective.init_state()``; the
train step passes it in and calls ``objective.update_state(state, metrics, step)`` after the
gradient step. A term's update sees its detached value and, when the term returns them, arrays
of its own (*state inputs*: CRD's embeddings of the step), which travel in ``metrics`` under
:data:`STATE_INPUTS` and are removed from it by ``update_state`` (what is logged stays scalars).

Terms with trainable parameters of their own (the projections of ``hidden_state`` between
different widths) declare ``init_params``: ``objective.init_params(key, inputs)`` makes them
from the inputs' shapes, the train state holds them and trains them with the student, and
``objective(inputs, state, params)`` hands each term its own.

The engine runs the models for exactly what the terms declare in ``needs``: per-layer hidden
states only when a term names ``student_hiddens``/``teacher_hiddens``, attention maps only for
``*_attentions`` (:attr:`Objective.input_keys`), so a term registered from user code gets the
same inputs as a built-in one.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Any, Callable, Mapping, MutableMapping

import jax
import jax.numpy as jnp

from jkd.losses import _common
from jkd.losses import divergences
from jkd.losses import features
from jkd.losses import fused as fused_lib
from jkd.losses import sparse as sparse_lib
from jkd.losses import taid as taid_lib
from jkd.losses import tokens
from jkd.losses import uld as uld_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossTerm:
  """A registered loss term.

  Attributes:
    fn: ``fn(inputs, **options) -> scalar``, or ``(scalar, {metric: value})`` whose extra
      metrics are logged as ``<term name>/<metric>``, or ``(scalar, {metric: value},
      state_inputs)`` with a pytree of arrays for the term's ``update_state`` (stateful terms
      also receive ``state=``).
    needs: the input keys the term reads, as alternatives (a tuple of tuples): the engine
      computes every key named here (hidden states, attention maps) and error messages list
      them.
    init_state: for stateful terms, ``init_state(**options) -> pytree``; a term whose
      ``init_state`` returns None for its options is stateless (its ``fn`` gets ``state=None``).
    update_state: ``update_state(state, value, step, **options) -> state``; a term whose ``fn``
      returned ``state_inputs`` gets them too, detached, as ``update_state(..., state_inputs=,
      **options)``.
    validate: optional ``validate(**options)`` run when the objective is built.
    init_params: for terms with trainable parameters, ``init_params(key, inputs, **options)
      -> pytree or None``; ``inputs`` may hold only shapes (``jax.ShapeDtypeStruct``). The
      term's ``fn`` then receives them as ``params=``.
    state_metrics: ``state_metrics(state) -> {name: scalar}``, logged as ``<term name>/<name>``
      at every step (TAID's ``t``).
  """
  fn: Callable[..., Array]
  needs: tuple[tuple[str, ...], ...] = ()
  init_state: Callable[..., Any] | None = None
  update_state: Callable[..., Any] | None = None
  validate: Callable[..., Any] | None = None
  init_params: Callable[..., Any] | None = None
  state_metrics: Callable[[Any], Mapping[str, Array]] | None = None


#: The registry of named loss terms. Add your own with :func:`register_loss_term`.
LOSS_TERMS: dict[str, LossTerm] = {}

#: The key of ``metrics`` under which :class:`Objective` hands the terms' state inputs
#: (``{term name: pytree}``) to :meth:`Objective.update_state`, which removes it.
STATE_INPUTS = "objective/state_inputs"


def register_loss_term(name: str, *, needs=(), init_state=None, update_state=None,
                       validate=None, init_params=None, state_metrics=None):
  """Decorator that registers ``fn(inputs, **options) -> scalar`` as the term ``name``.

  >>> @register_loss_term("my_l2", needs=(("student_logits",),))
  ... def my_l2(inputs, *, scale=1.0):
  ...   return scale * jnp.mean(inputs["student_logits"] ** 2)
  >>> total, metrics = build_objective({"my_l2": {"scale": 2.0}})({"student_logits": jnp.ones(3)})
  >>> float(total), sorted(metrics)
  (2.0, ['loss/my_l2', 'loss/total'])
  >>> del LOSS_TERMS["my_l2"]
  """
  def decorator(fn):
    if name in LOSS_TERMS:
      raise ValueError(f"a loss term named {name!r} is already registered.")
    LOSS_TERMS[name] = LossTerm(fn=fn, needs=tuple(tuple(n) for n in needs),
                                init_state=init_state, update_state=update_state,
                                validate=validate, init_params=init_params,
                                state_metrics=state_metrics)
    return fn
  return decorator


def token_mask(inputs: Mapping[str, Any]) -> Array | None:
  """The positions that count: ``where`` and ``labels != -100`` (either may be absent)."""
  mask = None
  if inputs.get("labels") is not None:
    mask = jnp.asarray(inputs["labels"]) != tokens.IGNORE_INDEX
  if inputs.get("where") is not None:
    where = jnp.asarray(inputs["where"]).astype(jnp.bool_)
    mask = where if mask is None else mask & where
  return mask


# ----------------------------------------------------------------------------------------------
# Built-in terms.
# ----------------------------------------------------------------------------------------------

_DIVERGENCE_NEEDS = (("student_logits", "teacher_logits"),
                     ("student_logits", "teacher_topk_ids", "teacher_topk_logprobs"),
                     ("student_hidden", "student_head", "teacher_hidden", "teacher_head"),
                     ("student_hidden", "student_head", "teacher_topk_ids",
                      "teacher_topk_logprobs"))


def _divergence_value(name: str, inputs: Mapping[str, Any], *, temperature: float,
                      fused: bool, chunk_size: int, tail: bool, options: dict) -> Array:
  """Masked token mean of divergence ``name`` from whichever teacher form ``inputs`` holds."""
  mask = token_mask(inputs)
  has = lambda *keys: all(inputs.get(k) is not None for k in keys)  # noqa: E731
  sparse_teacher = dict(teacher_ids=inputs.get("teacher_topk_ids"),
                        teacher_logprobs=inputs.get("teacher_topk_logprobs"))
  if fused:
    if has("student_hidden", "student_head", "teacher_hidden", "teacher_head"):
      return fused_lib.fused_linear_divergence(
          inputs["student_hidden"], inputs["student_head"], inputs["teacher_hidden"],
          inputs["teacher_head"], divergence=name, temperature=temperature, where=mask,
          chunk_size=chunk_size, **options)[0]
    if has("student_hidden", "student_head", "teacher_topk_ids", "teacher_topk_logprobs"):
      return fused_lib.fused_linear_sparse_divergence(
          inputs["student_hidden"], inputs["student_head"], **sparse_teacher, divergence=name,
          tail=tail, teacher_tail_logprob=inputs.get("teacher_tail_logprob"),
          temperature=temperature, where=mask, chunk_size=chunk_size, **options)[0]
  elif has("student_logits", "teacher_logits"):
    values = divergences.full_divergence(name, inputs["student_logits"], inputs["teacher_logits"],
                                         temperature=temperature, where=mask, **options)
    return tokens.masked_mean(values, mask)
  elif has("student_logits", "teacher_topk_ids", "teacher_topk_logprobs"):
    values = sparse_lib.sparse_divergence(
        inputs["student_logits"], **sparse_teacher, divergence=name, tail=tail,
        teacher_tail_logprob=inputs.get("teacher_tail_logprob"), temperature=temperature,
        where=mask, **options)
    return tokens.masked_mean(values, mask)
  raise ValueError(_missing_inputs_message(name, _DIVERGENCE_NEEDS, inputs))


def _missing_inputs_message(name: str, needs, inputs: Mapping[str, Any]) -> str:
  present = sorted(k for k, v in inputs.items() if v is not None)
  options = " or ".join("(" + ", ".join(n) + ")" for n in needs)
  return f"loss term {name!r} needs the inputs {options}; the batch has {present}."


def _register_divergence(name: str) -> None:
  def term(inputs, *, temperature: float = 1.0, fused: bool = False,
           chunk_size: int = fused_lib.DEFAULT_CHUNK_SIZE, tail: bool = True, **options):
    return _divergence_value(name, inputs, temperature=temperature, fused=fused,
                             chunk_size=chunk_size, tail=tail, options=options)

  def validate(*, temperature: float = 1.0, fused: bool = False,
               chunk_size: int = fused_lib.DEFAULT_CHUNK_SIZE, tail: bool = True, **options):
    del fused, tail
    _common.check_temperature(temperature)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
      raise ValueError(f"chunk_size must be a positive int (got {chunk_size!r}).")
    core_options = [n for n, p in inspect.signature(divergences.CORES[name]).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]
    allowed = ["temperature", "fused", "chunk_size", "tail"] + core_options
    unknown = sorted(set(options) - set(core_options))
    if unknown:
      hints = ", ".join(
          f"{u!r}" + (f" (did you mean {n[0]!r}?)" if (n := _common.nearest_names(u, allowed, 1))
                      else "") for u in unknown)
      raise ValueError(f"unknown option(s) {hints}; valid options: {allowed}.")
    divergences.resolve_core(name, options)

  term.__name__ = name
  register_loss_term(name, needs=_DIVERGENCE_NEEDS, validate=validate)(term)


for _name in ("forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
              "total_variation", "adaptive_kl", "balanced_kl"):
  _register_divergence(_name)


def _taid_term(inputs, *, state, temperature: float = 1.0, fused: bool = False,
               chunk_size: int = fused_lib.DEFAULT_CHUNK_SIZE, tail: bool = True,
               total_steps: int, t_start: float = 0.4, t_end: float = 1.0,
               alpha: float = 5e-4, beta: float = 0.99):
  del total_steps, t_start, t_end, alpha, beta
  return _divergence_value("taid", inputs, temperature=temperature, fused=fused,
                           chunk_size=chunk_size, tail=tail, options={"t": state.t})


def _taid_init(*, t_start: float = 0.4, **_):
  return taid_lib.taid_init(t_start=t_start)


def _taid_update(state, value, step, *, total_steps: int, t_start: float = 0.4,
                 t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99, **_):
  return taid_lib.taid_update(state, value, step, total_steps=total_steps, t_start=t_start,
                              t_end=t_end, alpha=alpha, beta=beta)


def _taid_validate(*, total_steps: int, t_start: float = 0.4, t_end: float = 1.0,
                   alpha: float = 5e-4, beta: float = 0.99, temperature: float = 1.0, **_):
  _common.check_temperature(temperature)
  state = taid_lib.taid_init(t_start=t_start)
  taid_lib.taid_update(state, 1.0, 0, total_steps=total_steps, t_start=t_start, t_end=t_end,
                       alpha=alpha, beta=beta)


register_loss_term("taid", needs=_DIVERGENCE_NEEDS, init_state=_taid_init,
                   update_state=_taid_update, validate=_taid_validate,
                   state_metrics=lambda state: {"t": state.t})(_taid_term)


@register_loss_term("cross_entropy", needs=(("student_logits", "labels"),
                                            ("student_hidden", "student_head", "labels")))
def _cross_entropy_term(inputs, *, label_smoothing: float = 0.0, fused: bool = False,
                        chunk_size: int = fused_lib.DEFAULT_CHUNK_SIZE):
  if inputs.get("labels") is None:
    raise ValueError(_missing_inputs_message("cross_entropy", LOSS_TERMS["cross_entropy"].needs,
                                             inputs))
  mask = token_mask(inputs)
  if fused:
    if label_smoothing:
      raise ValueError("cross_entropy with fused=True does not support label_smoothing.")
    return fused_lib.fused_linear_cross_entropy(
        inputs["student_hidden"], inputs["student_head"], inputs["labels"], where=mask,
        chunk_size=chunk_size)[0]
  values = tokens.cross_entropy(inputs["student_logits"], inputs["labels"], where=mask,
                                label_smoothing=label_smoothing)
  return tokens.masked_mean(values, mask)


def _layer_map(layer_map, n_student: int, n_teacher: int):
  return features.uniform_layer_map(n_student, n_teacher) if layer_map == "uniform" else layer_map


def _layers_and_width(hiddens) -> tuple[int, int]:
  """``(layers, width)`` of per-layer hidden states: a ``[L, B, T, H]`` array (or its shape) or
  a list of ``[B, T, H]``."""
  if isinstance(hiddens, (list, tuple)):
    return len(hiddens), hiddens[0].shape[-1]
  return hiddens.shape[0], hiddens.shape[-1]


def _hidden_state_params(key, inputs, *, layer_map="uniform", metric: str = "mse"):
  """One trainable ``[Hs, Ht]`` projection per mapped layer pair when the widths differ."""
  del metric
  if inputs.get("student_hiddens") is None or inputs.get("teacher_hiddens") is None:
    return None
  (ls, hs), (lt, ht) = map(_layers_and_width, (inputs["student_hiddens"],
                                                inputs["teacher_hiddens"]))
  if hs == ht:
    return None
  keys = jax.random.split(key, len(_layer_map(layer_map, ls, lt)))
  return jnp.stack([features.init_projection(k, hs, ht) for k in keys])


@register_loss_term("hidden_state", needs=(("student_hiddens", "teacher_hiddens"),),
                    init_params=_hidden_state_params)
def _hidden_state_term(inputs, *, params=None, layer_map="uniform", metric: str = "mse"):
  """Mapped per-layer hidden-state distance, through the term's learned projections when the
  widths differ (``params``), or ``inputs["projections"]`` when given."""
  s, t = inputs["student_hiddens"], inputs["teacher_hiddens"]
  (_, hs), (_, ht) = _layers_and_width(s), _layers_and_width(t)
  if params is None and inputs.get("projections") is None and hs != ht:
    raise ValueError(f"hidden_state: student width {hs} != teacher width {ht} and no"
                     " projections: make the term's parameters with"
                     " objective.init_params(key, inputs) (the engine does).")
  mask = token_mask(inputs)
  values = features.layer_map_hidden_loss(
      s, t, _layer_map(layer_map, len(s), len(t)),
      projections=params if params is not None else inputs.get("projections"),
      metric=metric, where=mask)
  return tokens.masked_mean(values, mask)


@register_loss_term("attention_transfer",
                    needs=(("student_attentions", "teacher_attentions"),))
def _attention_term(inputs, *, layer_map="uniform", heads: str = "mean", metric: str = "mse"):
  s, t = inputs["student_attentions"], inputs["teacher_attentions"]
  mask = token_mask(inputs)
  pairs = _layer_map(layer_map, len(s), len(t))
  values = [features.attention_transfer_loss(s[i], t[j], heads=heads, metric=metric, where=mask)
            for i, j in pairs]
  return tokens.masked_mean(sum(values[1:], values[0]) / len(values), mask)


@register_loss_term("token_relation", needs=(("student_hidden", "teacher_hidden"),))
def _token_relation_term(inputs):
  mask = token_mask(inputs)
  values = features.token_relation_loss(inputs["student_hidden"], inputs["teacher_hidden"],
                                        where=mask)
  return tokens.masked_mean(values, mask)


@register_loss_term("sinkhorn", needs=(("student_logits", "teacher_logits"),))
def _sinkhorn_term(inputs, *, temperature: float = 2.0, epsilon: float = 0.1,
                   iterations: int = 20):
  """SinKD over every position of the batch as one set (memory O((B*T)^2 * V): small batches)."""
  zs, zt = inputs["student_logits"], inputs["teacher_logits"]
  mask = token_mask(inputs)
  v = zs.shape[-1]
  return features.sinkhorn_loss(zs.reshape(-1, v), zt.reshape(-1, v), temperature=temperature,
                                epsilon=epsilon, iterations=iterations,
                                where=None if mask is None else mask.reshape(-1))


def _uld_validate(*, temperature: float = 1.0, top_k: int | None = None):
  uld_lib.uld_loss(jnp.zeros((1, 2)), jnp.zeros((1, 3)), temperature=temperature, top_k=top_k)


@register_loss_term("uld", needs=(("student_logits", "teacher_logits", "teacher_index"),
                                  ("student_logits", "teacher_logits")), validate=_uld_validate)
def _uld_term(inputs, *, temperature: float = 1.0, top_k: int | None = None):
  """ULD (cross-tokenizer): teacher logits gathered at ``teacher_index`` (-1 = masked out).

  Without ``teacher_index`` the positions are taken as aligned one to one.
  """
  if inputs.get("student_logits") is None or inputs.get("teacher_logits") is None:
    raise ValueError(_missing_inputs_message("uld", LOSS_TERMS["uld"].needs, inputs))
  zt, mask = inputs["teacher_logits"], token_mask(inputs)
  if inputs.get("teacher_index") is not None:
    zt, aligned = uld_lib.gather_aligned_logits(zt, inputs["teacher_index"])
    mask = aligned if mask is None else mask & aligned
  values = uld_lib.uld_loss(inputs["student_logits"], zt, temperature=temperature, where=mask,
                            top_k=top_k)
  return tokens.masked_mean(values, mask)


# ----------------------------------------------------------------------------------------------
# The objective.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class _BoundTerm:
  name: str
  term: LossTerm
  weight: float
  options: Mapping[str, Any]
  stateful: bool = False  # init_state gives a state for these options (not None)


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity: usable as a jit static.
class Objective:
  """A weighted sum of loss terms. Build it with :func:`build_objective`.

  ``objective(inputs, state) -> (total, metrics)`` is pure and jit-compatible; metrics hold
  ``loss/<name>`` for every term (unweighted) and ``loss/total``.
  """
  terms: tuple[_BoundTerm, ...]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.terms)

  @property
  def input_keys(self) -> frozenset[str]:
    """Every input key that some term's ``needs`` names (what the models must produce)."""
    return frozenset(key for t in self.terms for alternative in t.term.needs
                     for key in alternative)

  def init_params(self, key: Array, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Trainable parameters of the terms that have them, ``{term name: pytree}``.

    Args:
      key: a ``jax.random`` key (split per term).
      inputs: the objective's inputs, or their shapes (``jax.eval_shape`` of them).
    """
    params = {}
    for i, t in enumerate(self.terms):
      if t.term.init_params is not None:
        value = t.term.init_params(jax.random.fold_in(key, i), inputs, **t.options)
        if value is not None:
          params[t.name] = value
    return params

  def state_metrics(self, state: Mapping[str, Any]) -> dict[str, Array]:
    """``{"<term name>/<name>": value}`` from the stateful terms' ``state_metrics``."""
    return {f"{t.name}/{k}": v for t in self.terms
            if t.stateful and t.term.state_metrics is not None
            for k, v in t.term.state_metrics(state[t.name]).items()}

  def init_state(self) -> dict[str, Any]:
    """State of the stateful terms, ``{term name: pytree}`` (empty if none)."""
    return {t.name: t.term.init_state(**t.options) for t in self.terms if t.stateful}

  def __call__(self, inputs: Mapping[str, Any], state: Mapping[str, Any] | None = None,
               params: Mapping[str, Any] | None = None) -> tuple[Array, dict[str, Array]]:
    metrics = {}
    state_inputs = {}
    total = jnp.zeros((), jnp.float32)
    for t in self.terms:
      kwargs = dict(t.options)
      if t.stateful:
        if state is None or t.name not in state:
          raise ValueError(f"loss term {t.name!r} is stateful: pass objective.init_state() (and"
                           " its updates) as the state argument.")
        kwargs["state"] = state[t.name]
      elif t.term.init_state is not None:
        kwargs["state"] = None  # Stateless with these options (init_state gave None).
      if t.term.init_params is not None:
        kwargs["params"] = (params or {}).get(t.name)
      value = t.term.fn(inputs, **kwargs)
      if isinstance(value, tuple):  # (scalar, extra metrics[, state inputs]).
        if len(value) == 3 and value[2] is not None:
          state_inputs[t.name] = jax.tree.map(jax.lax.stop_gradient, value[2])
        value, extra = value[0], value[1]
        metrics.update({f"{t.name}/{k}": v for k, v in extra.items()})
      value = jnp.asarray(value, jnp.float32)
      if value.shape != ():
        raise ValueError(f"loss term {t.name!r} returned shape {value.shape}; terms must return"
                         " a scalar (reduce per-token values with jkd.losses.masked_mean).")
      metrics[f"loss/{t.name}"] = value
      total = total + t.weight * value
    metrics["loss/total"] = total
    if state_inputs:
      metrics[STATE_INPUTS] = state_inputs
    return total, metrics

  def update_state(self, state: Mapping[str, Any], metrics: Mapping[str, Any],
                   step: Array) -> dict[str, Any]:
    """Advances stateful terms from this step's (detached) term values and state inputs.

    The terms' state inputs (:data:`STATE_INPUTS`) are removed from ``metrics`` when it is a
    mutable mapping (the train step's dict), so that the metrics it logs are all scalars.

    With gradient accumulation the train step averages its metrics over the micro-batches,
    state inputs included: a term then sees the micro-batches' mean (see the term's docs).
    """
    state_inputs = (metrics.pop(STATE_INPUTS, None) if isinstance(metrics, MutableMapping)
                    else metrics.get(STATE_INPUTS)) or {}
    new = dict(state)
    for t in self.terms:
      if t.stateful and t.term.update_state is not None:
        value = jax.lax.stop_gradient(metrics[f"loss/{t.name}"])
        extra = {}
        if t.name in state_inputs:
          extra["state_inputs"] = jax.tree.map(jax.lax.stop_gradient, state_inputs[t.name])
        new[t.name] = t.term.update_state(state[t.name], value, step, **extra, **t.options)
    return new


def _check_options(name: str, term: LossTerm, options: dict) -> None:
  params = inspect.signature(term.fn).parameters
  accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  allowed = [n for n, p in params.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("state", "params")]
  if not accepts_any:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
      near = {u: _common.nearest_names(u, allowed, 1) for u in unknown}
      hints = ", ".join(f"{u!r} (did you mean {n[0]!r}?)" if n else repr(u)
                        for u, n in near.items())
      raise ValueError(f"loss term {name!r}: unknown option(s) {hints}; valid options:"
                       f" {allowed}.")
  missing = [n for n in allowed if params[n].default is inspect.Parameter.empty
             and n not in options]
  if missing:
    raise ValueError(f"loss term {name!r} needs the option(s) {missing}.")
  if term.validate is not None:
    try:
      term.validate(**options)
    except (ValueError, TypeError) as e:
      raise type(e)(f"loss term {name!r}: {e}") from None


def build_objective(spec: Mapping[str, Any]) -> Objective:
  """Builds an :class:`Objective` from a plain dict (the form a config file gives).

  Args:
    spec: ``{name: weight}`` or ``{name: {"term": registered_name, "weight": w, **options}}``.
      ``term`` defaults to ``name``; ``weight`` to 1.0. A ``ml_collections.ConfigDict`` works.

  Returns:
    The objective; its metrics are ``loss/<name>`` and ``loss/total``.

  Raises:
    ValueError: unknown term (with the nearest registered names), unknown or invalid option,
      non-finite weight, or an empty spec.

  >>> import jax.numpy as jnp
  >>> obj = build_objective({"forward_kl": 1.0, "ce": {"term": "cross_entropy", "weight": 0.5}})
  >>> z = jnp.zeros((1, 2, 4)); labels = jnp.array([[1, -100]])
  >>> total, m = obj({"student_logits": z, "teacher_logits": z, "labels": labels})
  >>> round(float(m["loss/ce"]), 4), round(float(total), 4)
  (1.3863, 0.6931)
  """
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  if not isinstance(spec, Mapping) or not spec:
    raise ValueError(f"an objective needs at least one term, e.g. {{'forward_kl': 1.0}};"
                     f" got {spec!r}.")
  bound = []
  for name, entry in spec.items():
    if isinstance(entry, numbers.Real) and not isinstance(entry, bool):
      entry = {"weight": entry}
    if not isinstance(entry, Mapping):
      raise ValueError(f"objective entry {name!r} must be a weight or a dict of options, got"
                       f" {entry!r}.")
    options = dict(entry)
    term_name = options.pop("term", name)
    weight = options.pop("weight", 1.0)
    if term_name not in LOSS_TERMS:
      near = _common.nearest_names(str(term_name), LOSS_TERMS)
      raise ValueError(f"unknown loss term {term_name!r}"
                       + (f"; did you mean {near}?" if near else "")
                       + f" Registered terms: {sorted(LOSS_TERMS)}.")
    if not isinstance(weight, numbers.Real) or not jnp.isfinite(weight):
      raise ValueError(f"objective entry {name!r}: weight must be a finite number, got"
                       f" {weight!r}.")
    term = LOSS_TERMS[term_name]
    _check_options(name, term, options)
    stateful = (term.init_state is not None
                and jax.eval_shape(lambda t=term, o=options: t.init_state(**o)) is not None)
    bound.append(_BoundTerm(name=name, term=term, weight=float(weight), options=options,
                            stateful=stateful))
  return Objective(terms=tuple(bound))
