"""Preference batches in the one train step: paired (DPO family, SimPO, ORPO, ...) and KTO.

:func:`jkd.train.model_inputs` hands these batches here. A **paired** batch holds

=============================  ================================================================
``chosen_tokens``              ``[B, T]`` int32, prompt + chosen completion, right-padded
``chosen_labels``              ``[B, T]`` next tokens, ``-100`` on the prompt and the padding
``rejected_tokens``/``_labels``  the same for the rejected completion (same ``T``)
``chosen_loss_mask``           optional ``[B, T]`` bool (and ``rejected_loss_mask``)
``reference_chosen_logps``     optional ``[B]`` float32 summed reference log-probs (and
                               ``reference_rejected_logps``): a precomputed reference
=============================  ================================================================

The student runs **once** over chosen and rejected concatenated on the batch axis (``2B`` rows);
:func:`jkd.losses.sequence_logprobs` (or :func:`jkd.losses.fused_sequence_logprobs` when a term
has ``fused=True``) gives ``policy_chosen``/``policy_rejected``. The reference
(``ref_chosen``/``ref_rejected``) comes from the batch when both reference fields are there,
else from the frozen teacher's forward over the same ``2B`` rows: the teacher *is* the reference
model (for plain DPO configure it as the initial policy, e.g. ``student.source="layers"`` with
``every=1``; for LLaVA-MoD-style DPO it is the big teacher). The teacher does not run at all when
no term reads a reference (SimPO, ORPO, CPO, REDI) and no distillation term is in the objective.
The chosen half is also given as ``student_logits``/``teacher_logits``/``labels``, so a
``cross_entropy`` term adds the NLL of the chosen completion (RPO) and a divergence term distils
on it.

A **list** batch (TPO: several ranked responses per prompt) holds ``list_tokens`` and
``list_labels`` ``[B, K, T]`` (response ``k`` of prompt ``b``, laid out as a pair's sides),
``list_scores`` ``[B, K]`` float (higher is better) and ``list_mask`` ``[B, K]`` bool (True where
a response is present: a prompt with fewer than ``K`` responses pads the rest); optionally
``list_loss_mask`` ``[B, K, T]`` and a precomputed reference ``reference_list_logps`` ``[B, K]``.
The student (and, for the reference, the teacher) runs once over the ``B * K`` rows; the
objective reads ``policy_list``/``ref_list`` (:class:`jkd.losses.SequenceLogprobs` of ``[B, K]``
arrays), ``list_scores`` and ``list_mask``, and, as for pairs, the best-scored response of each
list as ``student_logits``/``teacher_logits``/``labels`` (an NLL term on it is RPO's).

A **KTO** batch holds ``tokens``, ``labels`` (optionally ``loss_mask``) and ``desirable`` ``[B]``
bool; optionally ``reference_logps`` and ``reference_kl_logps`` ``[B]``. KTO's reference point
needs the completions on *mismatched* prompts: taken from ``kl_tokens``/``kl_labels`` when the
batch has them, else built in the step as TRL does, by pairing the prompt of row ``i`` with the
completion of row ``(i + 1) % B`` (:func:`mismatched_pairs`; with gradient accumulation, within
each micro-batch). The student and the teacher run once over the ``2B`` rows.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jkd import losses
from jkd import models
from jkd.data import teacher_cache
from jkd.losses import preference_objective

PyTree = Any

_PAIR_KEYS = ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels")
_PAIR_REFERENCE = ("reference_chosen_logps", "reference_rejected_logps")
_KTO_KEYS = ("tokens", "labels", "desirable")
_KTO_REFERENCE = ("reference_logps", "reference_kl_logps")
_LIST_KEYS = ("list_tokens", "list_labels", "list_scores")
_LIST_REFERENCE = ("reference_list_logps",)
_SPARSE = set(preference_objective.SPARSE_PAIR_INPUTS)
#: Optional batch fields of a paired batch holding the teacher's top-k (``{side}_`` prefixed:
#: ``chosen_``/``rejected_``): ids and log-probs ``[B, T, k]``, tail ``[B, T]``, and the
#: teacher's reference log-probs at those ids ``[B, T, k]`` (ADPA's advantage). Written by
#: :func:`pair_teacher_targets`; when the ids are there the step does not compute the top-k.
TOPK_FIELDS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob",
               "teacher_ref_logprobs")


def is_preference_batch(batch: Mapping[str, Any]) -> bool:
  """True for a paired (``chosen_tokens``), a list (``list_tokens``) or a KTO (``desirable``)
  batch."""
  return "chosen_tokens" in batch or "desirable" in batch or "list_tokens" in batch


def _given(keys) -> tuple[str, ...]:
  """The precomputed reference fields of a batch with these keys."""
  if "desirable" in keys:
    return _KTO_REFERENCE
  return _LIST_REFERENCE if "list_tokens" in keys else _PAIR_REFERENCE


def _needed_inputs(objective: losses.Objective) -> tuple[set[str], bool]:
  """The input names the objective's terms may read, and whether a non-preference term is in."""
  names, other = set(), False
  for t in objective.terms:
    needs = {n for alternative in t.term.needs for n in alternative}
    names |= needs
    other |= not needs & {"policy_chosen", "policy", "policy_list"} and not needs <= _SPARSE
  return names, other


def topk_size(objective: losses.Objective) -> int | None:
  """The ``k`` of the teacher's top-k that the DCKD/ADPA terms read (None: no such term).

  Raises:
    ValueError: two such terms with different ``k``.
  """
  ks = {int(t.options.get("k", 50)) for t in objective.terms
        if any("chosen_teacher_topk" in alt for alt in t.term.needs)}
  if len(ks) > 1:
    raise ValueError(f"the dckd/adpa terms ask for different teacher top-k sizes {sorted(ks)};"
                     " give them one k.")
  return ks.pop() if ks else None


def runs_teacher(objective: losses.Objective, batch_keys) -> bool:
  """Whether the step runs the teacher on a preference batch with these keys: a term needs a
  reference (or, DCKD/ADPA, the teacher's top-k) the batch lacks, or a (distillation) term
  other than the preference ones is in."""
  names, other = _needed_inputs(objective)
  keys = set(batch_keys)
  given = _given(keys)
  topk = "chosen_teacher_topk" in names and "chosen_teacher_topk_ids" not in keys
  return other or topk or (bool(names & {"ref_chosen", "ref", "ref_list"})
                           and not set(given) <= keys)


def _check(batch: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
  kto, lists = "desirable" in batch, "list_tokens" in batch
  required = _KTO_KEYS if kto else _LIST_KEYS if lists else _PAIR_KEYS
  given = _given(batch.keys())
  missing = [k for k in required if k not in batch]
  if missing:
    kind = "KTO" if kto else "list" if lists else "paired preference"
    raise ValueError(f"a {kind} batch needs {list(required)}; missing {missing} (the batch has"
                     f" {sorted(batch)}).")
  if lists:
    _check_list_shapes(batch)
  elif not kto and jnp.shape(batch["chosen_tokens"]) != jnp.shape(batch["rejected_tokens"]):
    raise ValueError(f"chosen_tokens {jnp.shape(batch['chosen_tokens'])} and rejected_tokens"
                     f" {jnp.shape(batch['rejected_tokens'])} differ in shape: pad both to one"
                     " [B, T].")
  half = [k for k in given if k in batch]
  if len(given) > 1 and len(half) == 1:
    raise ValueError(f"the batch has {half[0]} but not {[k for k in given if k not in batch]}:"
                     " give both precomputed reference fields or neither.")
  return required, given


def _labels(labels, mask):
  labels = jnp.asarray(labels)
  return labels if mask is None else jnp.where(jnp.asarray(mask, bool), labels,
                                                losses.IGNORE_INDEX)


def mismatched_pairs(tokens: jax.Array, labels: jax.Array, *, pad_id: int = 0
                     ) -> tuple[jax.Array, jax.Array]:
  """KTO's mismatched pairs: the prompt of row ``i`` followed by the completion of row
  ``(i + 1) % B`` (truncated to ``T``).

  The prompt of a row is its tokens up to and including the first loss position (the position
  that predicts the first completion token); its completion is the run of labels from there
  (assumed contiguous).

  Args:
    tokens: ``[B, T]`` int token ids.
    labels: ``[B, T]`` next tokens, ``-100`` where no loss is taken.
    pad_id: the token written after a completion.

  Returns:
    ``(tokens, labels)`` of the mismatched rows, ``[B, T]`` each.

  >>> import jax.numpy as jnp
  >>> tok = jnp.array([[1, 2, 3, 0], [4, 5, 6, 7]])
  >>> lab = jnp.array([[-100, 3, 9, -100], [-100, -100, 7, 8]])
  >>> t, l = mismatched_pairs(tok, lab)
  >>> t.tolist(), l.tolist()
  ([[1, 2, 7, 8], [4, 5, 6, 3]], [[-100, 7, 8, -100], [-100, -100, 3, 9]])
  """
  tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)
  t = tokens.shape[1]
  valid = labels != losses.IGNORE_INDEX
  start = jnp.where(valid.any(-1), jnp.argmax(valid, -1), t - 1)
  length = valid.sum(-1)
  nxt_start, nxt_len = jnp.roll(start, -1), jnp.roll(length, -1)
  nxt_labels = jnp.roll(labels, -1, axis=0)
  off = jnp.arange(t)[None, :] - start[:, None]  # Offset from this row's first loss position.

  def completion(shift):  # c_next[off - shift], clipped into the row.
    src = jnp.clip(nxt_start[:, None] + off - shift, 0, t - 1)
    return jnp.take_along_axis(nxt_labels, src, axis=1)

  new_labels = jnp.where((off >= 0) & (off < nxt_len[:, None]), completion(0),
                         losses.IGNORE_INDEX)
  new_tokens = jnp.where(off <= 0, tokens,
                         jnp.where(off - 1 < nxt_len[:, None], completion(1), pad_id))
  return new_tokens.astype(tokens.dtype), new_labels.astype(labels.dtype)


def _from_batch(sums: jax.Array, count: jax.Array) -> losses.SequenceLogprobs:
  sums = jnp.asarray(sums, jnp.float32)
  return losses.SequenceLogprobs(sum=sums, mean=jnp.where(count > 0, sums / jnp.maximum(count, 1),
                                                          jnp.nan), count=count)


def _forward(params, teacher_params, batch, tokens, labels, given, *, student_config,
             teacher_config, objective, fused):
  """Runs the student (and the teacher when needed) over ``[N, T]`` rows once.

  Returns:
    ``(s, head, t, t_head, policy, ref)``: the models' outputs and heads (``t``/``t_head`` None
    when the teacher does not run), and the rows' :class:`jkd.losses.SequenceLogprobs` under the
    student and the reference (the batch's ``given`` fields concatenated in order, else the
    teacher's, else None).
  """
  s = models.apply(params, tokens, config=student_config, return_logits=not fused)
  head = models.output_head(params, student_config)
  t = t_head = None
  if teacher_params is not None and runs_teacher(objective, batch.keys()):
    t = jax.tree.map(jax.lax.stop_gradient,
                     models.apply(teacher_params, tokens, config=teacher_config,
                                  return_logits=not fused))
    t_head = jax.lax.stop_gradient(models.output_head(teacher_params, teacher_config))

  def logprobs(out, out_head):
    if fused:
      return losses.fused_sequence_logprobs(out.hidden, out_head, labels)
    return losses.sequence_logprobs(out.logits, labels)

  policy = logprobs(s, head)
  if all(k in batch for k in given):
    ref = _from_batch(jnp.concatenate([jnp.asarray(batch[k]).reshape(-1) for k in given]),
                      policy.count)
  elif t is not None:
    ref = jax.tree.map(jax.lax.stop_gradient, logprobs(t, t_head))
  else:
    ref = None
  return s, head, t, t_head, policy, ref


def preference_inputs(params: PyTree, teacher_params: PyTree | None, batch: Mapping[str, Any], *,
                      student_config: models.ModelConfig,
                      teacher_config: models.ModelConfig | None, objective: losses.Objective,
                      fused: bool = False) -> tuple[dict[str, Any], jax.Array]:
  """The objective's inputs for a paired, list or KTO batch (see the module docstring).

  Args:
    params: the student's (policy's) parameters.
    teacher_params: the frozen teacher (the reference model), or None.
    batch: a paired or KTO batch, ``[B, T]`` token fields, or a list batch, ``[B, K, T]``.
    student_config, teacher_config: the models' configs.
    objective: the objective (decides whether the teacher runs).
    fused: sequence log-probs from hidden states and the head, chunked over tokens.

  Returns:
    ``(inputs, aux)``: ``policy_chosen``, ``policy_rejected``, ``ref_chosen``, ``ref_rejected``
    (KTO: ``policy``, ``ref``, ``policy_kl``, ``ref_kl``, ``desirable``) as
    :class:`jkd.losses.SequenceLogprobs` of ``[B]`` arrays (lists: ``policy_list``, ``ref_list``
    of ``[B, K]`` arrays, ``list_scores``, ``list_mask``); ``labels``, ``student_logits``
    ``[B, T, V]`` (and the teacher's) of the chosen (KTO: the given; lists: the best-scored)
    completions; ``aux`` the MoE router loss (0 without experts).
  """
  _, given = _check(batch)
  common = dict(student_config=student_config, teacher_config=teacher_config,
                 objective=objective, fused=fused)
  if "list_tokens" in batch:
    return _list_inputs(params, teacher_params, batch, given, **common)
  if "desirable" in batch:
    first = (jnp.asarray(batch["tokens"]), _labels(batch["labels"], batch.get("loss_mask")))
    if "kl_tokens" in batch:
      second = (jnp.asarray(batch["kl_tokens"]), _labels(batch["kl_labels"], None))
    else:
      second = mismatched_pairs(*first)
  else:
    first = (jnp.asarray(batch["chosen_tokens"]),
             _labels(batch["chosen_labels"], batch.get("chosen_loss_mask")))
    second = (jnp.asarray(batch["rejected_tokens"]),
              _labels(batch["rejected_labels"], batch.get("rejected_loss_mask")))
  b = first[0].shape[0]
  tokens = jnp.concatenate([first[0], second[0]], axis=0)
  labels = jnp.concatenate([first[1], second[1]], axis=0)
  s, head, t, t_head, policy, ref = _forward(params, teacher_params, batch, tokens, labels,
                                             given, **common)
  halves = lambda lp: ((None, None) if lp is None else  # noqa: E731
                       (jax.tree.map(lambda x: x[:b], lp), jax.tree.map(lambda x: x[b:], lp)))
  (pa, pb), (ra, rb) = halves(policy), halves(ref)
  if "desirable" in batch:
    inputs = {"policy": pa, "ref": ra, "policy_kl": jax.tree.map(jax.lax.stop_gradient, pb),
              "ref_kl": rb, "desirable": jnp.asarray(batch["desirable"], bool)}
  else:
    inputs = {"policy_chosen": pa, "policy_rejected": pb, "ref_chosen": ra, "ref_rejected": rb}
  first_half = lambda x: None if x is None else x[:b]  # noqa: E731
  inputs.update(labels=first[1], where=None, student_logits=first_half(s.logits),
                student_hidden=first_half(s.hidden), student_head=head)
  if t is not None:
    inputs.update(teacher_logits=first_half(t.logits), teacher_hidden=first_half(t.hidden),
                  teacher_head=t_head)
  if _needed_inputs(objective)[0] & _SPARSE:
    inputs.update(_sparse_pair_inputs(batch, s, t, (first[1], second[1]), b,
                                      k=topk_size(objective), fused=fused))
  aux = s.aux_loss * student_config.router_aux_loss_coef if student_config.num_experts else 0.0
  return inputs, jnp.asarray(aux, jnp.float32)


def _check_list_shapes(batch: Mapping[str, Any]) -> None:
  shape = tuple(jnp.shape(batch["list_tokens"]))
  if len(shape) != 3 or shape[1] < 2:
    raise ValueError(f"list_tokens must be [B, K, T] with K >= 2 responses per prompt, got"
                     f" {list(shape)}.")
  want = {"list_labels": shape, "list_loss_mask": shape, "list_scores": shape[:2],
          "list_mask": shape[:2], "reference_list_logps": shape[:2]}
  for name, expect in want.items():
    if name in batch and tuple(jnp.shape(batch[name])) != expect:
      raise ValueError(f"{name} has shape {list(jnp.shape(batch[name]))} but list_tokens"
                       f" {list(shape)} needs {list(expect)}.")


def _list_mask(batch: Mapping[str, Any], labels: jax.Array) -> jax.Array:
  """``list_mask``, or (absent) True where a response has a completion label."""
  if "list_mask" in batch:
    return jnp.asarray(batch["list_mask"], bool)
  return jnp.any(labels != losses.IGNORE_INDEX, axis=-1)


def _list_inputs(params, teacher_params, batch, given, *, student_config, teacher_config,
                 objective, fused):
  """:func:`preference_inputs` of a list batch: the ``B * K`` rows through the models once."""
  if _needed_inputs(objective)[0] & _SPARSE:
    raise ValueError("the dckd/adpa terms need paired batches (chosen/rejected), not lists.")
  b, k, t_len = jnp.shape(batch["list_tokens"])
  labels3 = _labels(batch["list_labels"], batch.get("list_loss_mask"))
  tokens = jnp.asarray(batch["list_tokens"]).reshape(b * k, t_len)
  labels = labels3.reshape(b * k, t_len)
  s, head, t, t_head, policy, ref = _forward(
      params, teacher_params, batch, tokens, labels, given, student_config=student_config,
      teacher_config=teacher_config, objective=objective, fused=fused)
  grid = lambda lp: None if lp is None else jax.tree.map(  # noqa: E731
      lambda x: x.reshape(b, k), lp)
  scores = jnp.asarray(batch["list_scores"], jnp.float32)
  mask = _list_mask(batch, labels3)
  best = losses.best_and_worst(scores, mask)[0]
  rows = jnp.arange(b) * k + best  # The best-scored response of each list.
  pick = lambda x: None if x is None else x[rows]  # noqa: E731
  inputs = {"policy_list": grid(policy), "ref_list": grid(ref), "list_scores": scores,
            "list_mask": mask, "labels": labels[rows], "where": None,
            "student_logits": pick(s.logits), "student_hidden": pick(s.hidden),
            "student_head": head}
  if t is not None:
    inputs.update(teacher_logits=pick(t.logits), teacher_hidden=pick(t.hidden),
                  teacher_head=t_head)
  aux = s.aux_loss * student_config.router_aux_loss_coef if student_config.num_experts else 0.0
  return inputs, jnp.asarray(aux, jnp.float32)


def _sparse_pair_inputs(batch, s, t, labels, b: int, *, k: int, fused: bool) -> dict[str, Any]:
  """DCKD/ADPA inputs: per-side student logits and labels, the teacher's top-k (from the batch's
  :data:`TOPK_FIELDS`, else from the teacher's logits) and the teacher's reference log-probs."""
  if "desirable" in batch:
    raise ValueError("the dckd/adpa terms need paired batches (chosen/rejected), not KTO.")
  if fused or s.logits is None:
    raise ValueError("the dckd/adpa terms need the student's logits: drop fused=True.")
  out: dict[str, Any] = {}
  for i, side in enumerate(("chosen", "rejected")):
    rows = slice(0, b) if i == 0 else slice(b, 2 * b)
    out[f"{side}_student_logits"], out[f"{side}_labels"] = s.logits[rows], labels[i]
    if f"{side}_teacher_topk_ids" in batch:
      ids = jnp.asarray(batch[f"{side}_teacher_topk_ids"]).astype(jnp.int32)
      lp = jnp.asarray(batch[f"{side}_teacher_topk_logprobs"], jnp.float32)
      tail = batch.get(f"{side}_teacher_tail_logprob")
      tail = None if tail is None else jnp.asarray(tail, jnp.float32)
    elif t is not None:
      ids, lp, tail = topk_logprobs(t.logits[rows], k)
    else:
      ids = None
    out[f"{side}_teacher_topk"] = None if ids is None else losses.SparseTeacher(ids, lp, tail)
    ref = batch.get(f"{side}_teacher_ref_logprobs")
    out[f"{side}_teacher_ref_logprobs"] = None if ref is None else jnp.asarray(ref, jnp.float32)
  return out


def topk_logprobs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(ids, log-probs, log tail mass)`` of the top ``k`` of ``logits`` (gradient stopped); see
  :func:`jkd.data.teacher_cache.topk_logprobs`."""
  if not 1 <= k <= logits.shape[-1]:
    raise ValueError(f"k={k} teacher ids per position, but the vocabulary has"
                     f" {logits.shape[-1]}: use 1 <= k <= vocab.")
  return jax.tree.map(jax.lax.stop_gradient, teacher_cache.topk_logprobs(logits, k))


def pair_teacher_targets(pairs: Mapping[str, Any], *, teacher: tuple[PyTree, models.ModelConfig],
                         reference: tuple[PyTree, models.ModelConfig] | None = None, k: int = 50,
                         batch_size: int = 8) -> dict[str, np.ndarray]:
  """The teacher's top-k on tokenized pairs, as batch fields (:data:`TOPK_FIELDS`), offline.

  ADPA's advantage needs the aligned teacher's top-k ids and log-probs and the teacher's
  reference (pre-alignment) log-probs at those ids: compute them once here and add them to the
  pairs (e.g. an ``.npz`` for ``data.source='pairs'``); DCKD can use them too instead of
  running the teacher in the step.

  Args:
    pairs: ``chosen_tokens``, ``rejected_tokens`` ``[N, T]`` int arrays.
    teacher: ``(params, config)`` of the aligned teacher.
    reference: ``(params, config)`` of the teacher's reference model (same vocabulary), or None.
    k: ids kept per position.
    batch_size: sequences per forward pass.

  Returns:
    ``{side}_teacher_topk_ids`` ``[N, T, k]`` int32, ``{side}_teacher_topk_logprobs``
    ``[N, T, k]`` float32, ``{side}_teacher_tail_logprob`` ``[N, T]`` float32 and, with a
    reference, ``{side}_teacher_ref_logprobs`` ``[N, T, k]`` float32, for ``side`` in
    ``chosen``, ``rejected``.
  """
  (tp, tc) = teacher
  if reference is not None and reference[1].vocab_size != tc.vocab_size:
    raise ValueError(f"the reference's vocabulary {reference[1].vocab_size} != the teacher's"
                     f" {tc.vocab_size}: ADPA's advantage compares one vocabulary.")

  @jax.jit
  def targets(tp, tokens, ref_params):
    ids, lp, tail = topk_logprobs(models.apply(tp, tokens, config=tc).logits, k)
    if ref_params is None:
      return ids, lp, tail, None
    ref = jax.nn.log_softmax(models.apply(ref_params, tokens, config=reference[1]).logits
                             .astype(jnp.float32), axis=-1)
    return ids, lp, tail, jnp.take_along_axis(ref, ids, axis=-1)

  out: dict[str, np.ndarray] = {}
  names = TOPK_FIELDS if reference is not None else TOPK_FIELDS[:3]
  for side in ("chosen", "rejected"):
    tokens = np.asarray(pairs[f"{side}_tokens"], np.int32)
    n = len(tokens)
    pad = -(-n // batch_size) * batch_size - n
    tokens = np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), np.int32)])
    parts = [targets(tp, tokens[i:i + batch_size], None if reference is None else reference[0])
             for i in range(0, len(tokens), batch_size)]
    for j, name in enumerate(names):
      out[f"{side}_{name}"] = np.concatenate([np.asarray(p[j]) for p in parts])[:n]
  return out


def completion_tokens(batch: Mapping[str, Any], inputs: Mapping[str, Any]) -> jax.Array:
  """``train/tokens``: the counted (completion) tokens of a batch; chosen + rejected for pairs,
  every response for lists."""
  if "list_labels" in batch:
    count = jnp.sum(_labels(batch["list_labels"], batch.get("list_loss_mask"))
                    != losses.IGNORE_INDEX)
  elif "chosen_labels" in batch:
    count = sum(jnp.sum(_labels(batch[f"{side}_labels"], batch.get(f"{side}_loss_mask"))
                        != losses.IGNORE_INDEX) for side in ("chosen", "rejected"))
  else:
    count = jnp.sum(losses.token_mask(inputs))
  return jnp.asarray(count, jnp.float32)


def work(batch_shapes: Mapping[str, tuple[int, ...]], objective: losses.Objective
         ) -> tuple[int, int, int]:
  """``(rows the student runs, rows the teacher runs, sequence length)`` of one batch with these
  array shapes (pairs: chosen + rejected; lists: every response slot; KTO: the given and the
  mismatched rows)."""
  if "list_tokens" in batch_shapes:
    b, k, seq = batch_shapes["list_tokens"][:3]
    return b * k, b * k if runs_teacher(objective, batch_shapes) else 0, seq
  if "chosen_tokens" in batch_shapes:
    rows, seq = batch_shapes["chosen_tokens"][:2]
  else:
    rows, seq = batch_shapes["tokens"][:2]
    if "desirable" not in batch_shapes:
      return rows, rows, seq
  return 2 * rows, 2 * rows if runs_teacher(objective, batch_shapes) else 0, seq
