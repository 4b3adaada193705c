"""Dual-head distillation (DHO): a second output head learns from the teacher, the first from the
labels, on the same backbone; the two are mixed at inference (docs/methods.md §14).

Training (the loss term ``dual_head`` next to ``cross_entropy`` in one objective)::

  objective = build_objective({
      "ce": {"term": "cross_entropy", "weight": 0.5},         # main head  W  <- labels
      "dual_head": {"weight": 0.5, "temperature": 2.0},       # aux head   A  <- teacher
  })

The auxiliary head is the term's own trainable parameter (``term_params``, trained by the same
optimizer and checkpointed with the student). The term only ever receives shapes when it makes
that parameter, never the student's weights, so by default (``head="delta"``) the aux head is
the live main head plus a trainable correction started at zero,

.. math:: A = \\mathrm{sg}(W) + \\Delta,\\qquad \\Delta_0 = 0,

``sg`` the stop-gradient: the KD loss moves ``Delta`` and the backbone, never ``W``; the CE loss
moves ``W`` and the backbone, never ``Delta``. At step 0 the two heads are equal (as in the
paper's ImageNet code, which starts both from the same classifier). Unlike two free heads, the
aux head's *value* also follows the CE updates of ``W`` (``A_t = W_t + Delta_t``): what the KD
loss owns is the difference ``Delta``. ``head="separate"`` gives the paper's literal, independent
head ``A = Delta``, started at zero (the uniform distribution) instead.

Inference and export (pure functions): :func:`dual_head_logprobs` mixes the two heads'
distributions, :func:`export_params` drops the aux head or merges both into one linear head.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jkd import precision
from jkd.losses import _common
from jkd.losses import divergences
from jkd.losses import fused as fused_lib
from jkd.losses import objective as objective_lib

Array = jax.Array
PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST

#: ``head`` option -> the key of the term's parameters: ``A = sg(W) + params["aux_delta"]``, or
#: ``A = params["aux_head"]``.
HEADS = {"delta": "aux_delta", "separate": "aux_head"}
#: :func:`export_params` modes.
EXPORT_MODES = ("drop", "merge")


# --- The aux head. ----------------------------------------------------------------------------

def _own_params(params: Any) -> tuple[str, Array]:
  """``(key, array)`` of one dual-head term's parameters, or a clear error."""
  if isinstance(params, Mapping) and len(params) == 1 and next(iter(params)) in HEADS.values():
    key = next(iter(params))
    return key, params[key]
  raise ValueError(
      f"not the parameters of a dual_head term: expected {{'aux_delta': [H, V]}} or"
      f" {{'aux_head': [H, V]}}, got {jax.tree.map(lambda x: getattr(x, 'shape', x), params)}."
      " Make them with objective.init_params(key, inputs) (the engine does).")


def aux_head(main_head: Array, params: Mapping[str, Array]) -> Array:
  r"""The auxiliary head ``A`` ``[H, V]`` from the main head and the term's parameters.

  .. math:: A = \mathrm{sg}(W) + \Delta \ \ (\texttt{aux\_delta}),\qquad
            A = A_{\mathrm{own}}\ \ (\texttt{aux\_head})

  Args:
    main_head: ``[H, V]`` main output head ``W`` (``embedding.T`` when tied); no gradient
      reaches it through ``A``.
    params: the ``dual_head`` term's parameters, ``{"aux_delta": [H, V]}`` or
      ``{"aux_head": [H, V]}``.

  Returns:
    ``[H, V]`` in the promoted dtype of the inputs.

  >>> import jax.numpy as jnp
  >>> aux_head(jnp.ones((2, 3)), {"aux_delta": jnp.zeros((2, 3))}).tolist()
  [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
  """
  key, own = _own_params(params)
  main_head = _common.check_float_array(main_head, "main_head")
  own = _common.check_float_array(own, key)
  if main_head.ndim != 2 or own.shape != main_head.shape:
    raise ValueError(f"the dual_head term's {key} has shape {own.shape} but the main head is"
                     f" {main_head.shape}: both must be [hidden, vocab] of this student (were"
                     " the term's parameters made for another model?).")
  if key == HEADS["separate"]:
    return own
  return jax.lax.stop_gradient(main_head) + own


def _float(x: Any, name: str) -> Array:
  x = _common.check_float_array(x, name)
  return x.astype(_common.compute_dtype(x.dtype))


def _check_heads(hidden: Array, *heads: tuple[str, Array]) -> None:
  if hidden.ndim < 1:
    raise ValueError("hidden must be [..., H] final hidden states (after the final norm).")
  for name, head in heads:
    if head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
      raise ValueError(f"{name} has shape {head.shape} but must be [H, V] with H ="
                       f" {hidden.shape[-1]}, the width of hidden {hidden.shape}.")
  if heads[0][1].shape != heads[-1][1].shape:
    raise ValueError(f"{heads[0][0]} {heads[0][1].shape} and {heads[-1][0]}"
                     f" {heads[-1][1].shape} must have the same [H, V] shape.")


def check_mixing(alpha: Any, beta: Any) -> tuple[float, float]:
  """Validates the inference weights: ``alpha`` in ``[0, 1]``, ``beta > 0``.

  >>> check_mixing(0.5, 1)
  (0.5, 1.0)
  """
  return (_common.check_unit_interval(alpha, "alpha"),
          _common.check_positive(beta, "beta (the aux head's inference temperature)"))


def dual_head_logprobs(hidden: Array, main_head: Array, aux_head: Array, *, alpha: float = 0.5,
                       beta: float = 1.0) -> Array:
  r"""Log-probabilities of DHO's inference distribution, a mixture of the two heads'.

  .. math:: p = \alpha\,\mathrm{softmax}(h W) + (1 - \alpha)\,\mathrm{softmax}(h A / \beta)

  computed in log space: ``logaddexp(log a + log_softmax(hW), log(1-a) + log_softmax(hA/b))``
  (at ``alpha`` 0 or 1, one head's ``log_softmax``), in float32 (float64 inputs stay float64),
  products at ``Precision.HIGHEST``. ``alpha`` and ``beta`` are chosen after training (the paper
  searches them on held-out data); no retraining is needed to change them.

  Args:
    hidden: ``[..., H]`` final hidden states (after the final norm).
    main_head: ``[H, V]`` main head ``W`` (trained on the labels).
    aux_head: ``[H, V]`` auxiliary head ``A`` (trained on the teacher; see :func:`aux_head`).
    alpha: weight of the main head's distribution, in ``[0, 1]`` (default 0.5).
    beta: temperature of the aux head's logits, ``> 0`` (default 1.0).

  Returns:
    ``[..., V]`` log-probabilities.

  Raises:
    ValueError: ``alpha`` outside ``[0, 1]``, ``beta <= 0``, or shapes that do not fit.

  References: Kang, Lee, Jang, Hwang, *Simple yet Effective Semi-supervised Knowledge
  Distillation from Vision-Language Models via Dual-Head Optimization*, arXiv:2505.07675, 2025.

  >>> import jax.numpy as jnp
  >>> h = jnp.array([[1.0, 0.0]]); w = jnp.zeros((2, 3)); a = jnp.zeros((2, 3))
  >>> [round(float(x), 4) for x in jnp.exp(dual_head_logprobs(h, w, a))[0]]
  [0.3333, 0.3333, 0.3333]
  """
  alpha, beta = check_mixing(alpha, beta)
  h, w, a = _float(hidden, "hidden"), _float(main_head, "main_head"), _float(aux_head, "aux_head")
  _check_heads(h, ("main_head", w), ("aux_head", a))
  main = jax.nn.log_softmax(jnp.matmul(h, w, precision=_HIGHEST), axis=-1)
  if alpha == 1.0:
    return main
  aux = jax.nn.log_softmax(jnp.matmul(h, a, precision=_HIGHEST) / beta, axis=-1)
  if alpha == 0.0:
    return aux
  return jnp.logaddexp(jnp.log(alpha) + main, jnp.log1p(-alpha) + aux)


def merged_head(main_head: Array, aux_head: Array, *, alpha: float = 0.5,
                beta: float = 1.0) -> Array:
  r"""One linear head from the two: the logit-level merge ``alpha W + (1 - alpha) A / beta``.

  Its logits are ``alpha z_W + (1-alpha) z_A / beta``, so its distribution is the normalised
  *geometric* mixture ``p_W^alpha p_A'^(1-alpha) / Z`` (``p_A' = softmax(z_A / beta)``), not the
  arithmetic mixture of :func:`dual_head_logprobs`; the two agree at ``alpha`` 0 or 1 or when the
  heads agree, and ``0 <= KL(geometric || arithmetic) <= -log Z`` (AM-GM), ``Z`` the
  Bhattacharyya-type coefficient ``sum_v p_W^alpha p_A'^(1-alpha) <= 1``.

  >>> import jax.numpy as jnp
  >>> merged_head(jnp.ones((1, 2)), 3 * jnp.ones((1, 2)), alpha=0.5, beta=1.0).tolist()
  [[2.0, 2.0]]
  """
  alpha, beta = check_mixing(alpha, beta)
  w, a = _float(main_head, "main_head"), _float(aux_head, "aux_head")
  if w.ndim != 2 or w.shape != a.shape:
    raise ValueError(f"main_head {w.shape} and aux_head {a.shape} must both be [H, V].")
  return alpha * w + ((1.0 - alpha) / beta) * a


def _find_term_params(term_params: Any) -> Mapping[str, Array] | None:
  """The one dual-head entry of ``term_params`` (the term's own params, or the train state's
  ``{term name: params}``); None if there is none."""
  if not term_params:
    return None
  if isinstance(term_params, Mapping) and set(term_params) & set(HEADS.values()):
    _own_params(term_params)
    return term_params
  found = {name: p for name, p in term_params.items()
           if isinstance(p, Mapping) and set(p) & set(HEADS.values())}
  if len(found) > 1:
    raise ValueError(f"term_params hold several dual_head terms {sorted(found)}: pass the one to"
                     " export, term_params[name].")
  return next(iter(found.values()), None)


def check_export(mode: Any, alpha: Any, beta: Any) -> tuple[str, float, float]:
  """Validates :func:`export_params`'s options: ``mode`` in :data:`EXPORT_MODES`, ``alpha``
  in ``[0, 1]``, ``beta > 0``.

  >>> check_export("merge", 0.25, 2)
  ('merge', 0.25, 2.0)
  """
  if not isinstance(mode, str) or mode not in EXPORT_MODES:
    near = _common.nearest_names(str(mode), EXPORT_MODES, 1)
    raise ValueError(f"unknown dual-head export mode {mode!r}; use one of {list(EXPORT_MODES)}"
                     + (f" (did you mean {near[0]!r}?)" if near else "."))
  return (mode, *check_mixing(alpha, beta))


def export_params(params: PyTree, term_params: Any, config: Any, *, mode: str = "drop",
                  alpha: float = 0.5, beta: float = 1.0) -> tuple[PyTree, Any]:
  r"""The student to export, with its aux head dropped or merged into one linear head.

  * ``mode="drop"``: the main head alone, ``params`` and ``config`` unchanged (the aux head
    only shaped the backbone).
  * ``mode="merge"``: the head becomes :func:`merged_head`,
    ``M = alpha W + (1 - alpha) A / beta``. A logit-level merge, so the exported model's
    distribution is the geometric mixture of the heads, not the arithmetic mixture
    :func:`dual_head_logprobs` (see :func:`merged_head`). With tied embeddings the merge unties
    the head: ``config.tie_embeddings`` becomes False, the embedding stays the input embedding and
    ``lm_head = M`` is added (``H x V`` more parameters).

  Args:
    params: the student's parameters (``jkd.models`` layout: ``embed/embedding`` ``[V, H]``,
      ``lm_head`` ``[H, V]`` when untied).
    term_params: the train state's ``{term name: params}`` (one ``dual_head`` entry) or that
      term's own ``{"aux_delta"|"aux_head": [H, V]}``; may be empty for ``"drop"``.
    config: the student's :class:`jkd.models.ModelConfig`.
    mode: ``"drop"`` or ``"merge"``.
    alpha, beta: the mixing weight in ``[0, 1]`` and the aux temperature ``> 0`` (for merge).

  Returns:
    ``(params, config)`` for :func:`jkd.models.save_hf`.

  Raises:
    ValueError: an unknown mode, ``alpha`` outside ``[0, 1]``, ``beta <= 0``, or ``merge``
      without a dual-head term's parameters.

  >>> import jax.numpy as jnp
  >>> from jkd import models
  >>> cfg = models.ModelConfig(vocab_size=4, hidden_size=2, intermediate_size=4, num_layers=1,
  ...                          num_heads=1, num_kv_heads=1)
  >>> p = {"embed": {"embedding": jnp.ones((4, 2))}}
  >>> p2, cfg2 = export_params(p, {"dual_head": {"aux_delta": jnp.ones((2, 4))}}, cfg,
  ...                          mode="merge", alpha=0.5, beta=1.0)
  >>> cfg2.tie_embeddings, p2["lm_head"].tolist()
  (False, [[1.5, 1.5, 1.5, 1.5], [1.5, 1.5, 1.5, 1.5]])
  """
  mode, alpha, beta = check_export(mode, alpha, beta)
  if mode == "drop":
    return params, config
  own = _find_term_params(term_params)
  if own is None:
    raise ValueError("mode='merge' needs the dual_head term's parameters (the train state's"
                     " term_params); this run has none: export with mode='drop'.")
  main = params["embed"]["embedding"].T if config.tie_embeddings else params["lm_head"]
  merged = merged_head(main, aux_head(main, own), alpha=alpha, beta=beta)
  out = dict(params)
  out["lm_head"] = merged.astype(jnp.result_type(main))
  return out, config.replace(tie_embeddings=False)


# --- The loss term. ---------------------------------------------------------------------------

_NEEDS = (("student_hidden", "student_head", "teacher_logits"),
          ("student_hidden", "student_head", "teacher_topk_ids", "teacher_topk_logprobs"),
          ("student_hidden", "student_head", "teacher_hidden", "teacher_head"))


def _init_params(key, inputs, *, head: str = "delta", **_):
  """Zeros ``[H, V]`` shaped like the student's head: ``Delta`` (``A = W`` at step 0) or the
  separate head (uniform at step 0)."""
  del key
  shape = getattr(inputs.get("student_head"), "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError("dual_head makes its aux head from the student's output head: the inputs"
                     f" need student_head [H, V] (got {shape}).")
  return {HEADS[head]: jnp.zeros(tuple(shape), jnp.float32)}


def _validate(*, divergence: str = "forward_kl", temperature: float = 1.0, head: str = "delta",
              fused: bool = False, chunk_size: int = fused_lib.DEFAULT_CHUNK_SIZE,
              tail: bool = True, **options):
  del fused, tail
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; use 'delta' (A = sg(W) + Delta, Delta from 0) or"
                     " 'separate' (an independent head from 0).")
  if divergence not in divergences.CORES:
    near = _common.nearest_names(str(divergence), divergences.CORES, 1)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of"
                     f" {sorted(divergences.CORES)}"
                     + (f" (did you mean {near[0]!r}?)" if near else "."))
  _common.check_temperature(temperature)
  if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int (got {chunk_size!r}).")
  core = [n for n, p in inspect.signature(divergences.CORES[divergence]).parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(core))
  if unknown:
    allowed = ["divergence", "temperature", "head", "fused", "chunk_size", "tail"] + core
    raise ValueError(f"unknown option(s) {unknown} for divergence {divergence!r}; valid"
                     f" options: {allowed}.")
  divergences.resolve_core(divergence, options)


def _dual_head_term(inputs, *, params=None, divergence: str = "forward_kl",
                    temperature: float = 1.0, head: str = "delta", fused: bool = False,
                    chunk_size: int = fused_lib.DEFAULT_CHUNK_SIZE, tail: bool = True,
                    **options):
  """The KD divergence of the aux head (``A`` from :func:`aux_head`) to the teacher, a masked
  token mean; logs ``<name>/aux_rms`` (RMS of ``Delta`` or of the separate head)."""
  if params is None:
    raise ValueError("dual_head has no parameters: make them with objective.init_params(key,"
                     " inputs) and pass them as objective(inputs, state, params) (the engine"
                     " does).")
  have = {k for k, v in inputs.items() if v is not None}
  teacher = ([("teacher_hidden", "teacher_head"), ("teacher_topk_ids", "teacher_topk_logprobs")]
             if fused else [("teacher_logits",), ("teacher_topk_ids", "teacher_topk_logprobs")])
  if not {"student_hidden", "student_head"} <= have or not any(set(t) <= have for t in teacher):
    forms = " or ".join("(" + ", ".join(("student_hidden", "student_head") + t) + ")"
                        for t in teacher)
    hint = "" if fused else (" (a fused objective has no teacher_logits: give this term"
                             " fused=True too)" if "teacher_hidden" in have else "")
    raise ValueError(f"loss term 'dual_head' (fused={fused}) needs the inputs {forms}; the"
                     f" batch has {sorted(have)}{hint}.")
  del head  # The parameters' key says which form they are.
  hidden = inputs["student_hidden"]
  a = aux_head(inputs["student_head"], params)
  if fused:
    aux_inputs = {**inputs, "student_head": a}
  else:
    # As the main head's logits in jkd.models.apply: operands in the hidden states' dtype,
    # float32 accumulation and result.
    logits = precision.dot(hidden, a.astype(hidden.dtype), dtype=hidden.dtype,
                           out_dtype=_common.compute_dtype(hidden.dtype))
    aux_inputs = {**inputs, "student_logits": logits}
  value = objective_lib._divergence_value(  # noqa: SLF001  (the shared dispatch over teachers)
      divergence, aux_inputs, temperature=temperature, fused=fused, chunk_size=chunk_size,
      tail=tail, options=options)
  own = next(iter(params.values()))
  rms = jnp.sqrt(jnp.mean(jnp.square(jax.lax.stop_gradient(own).astype(jnp.float32))))
  return value, {"aux_rms": rms}


objective_lib.register_loss_term("dual_head", needs=_NEEDS, init_params=_init_params,
                                 validate=_validate)(_dual_head_term)
