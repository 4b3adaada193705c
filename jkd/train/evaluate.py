"""Held-out evaluation: NLL and perplexity, student-teacher KL, top-1 agreement, calibration.

Evaluation is split into a pure, jit-able per-batch reduction (:func:`eval_sums`, sums over the
counted positions, so batches of any composition add up exactly) and a host-side
:func:`eval_metrics` that turns the accumulated sums into metrics. :func:`make_eval_step` and
:func:`evaluate_batches` run the student (and teacher) over batches with them.

Metrics (``eval/`` namespace), over positions with ``labels != -100`` and ``where``:

=======================  ==========================================================================
``student_nll``          mean ``-log q(y)``; ``student_ppl`` = ``exp(student_nll)``
``teacher_nll``          mean ``-log p(y)``; ``teacher_ppl`` likewise
``kl_forward``           mean ``KL(p || q)`` (teacher ``p``, student ``q``, temperature 1)
``top1_agreement``       fraction of positions where ``argmax q == argmax p``
``student_ece``          expected calibration error of ``q`` (15 equal-width confidence bins:
                         ``sum_b |sum_{i in b} (correct_i - conf_i)| / N``, conf = max prob)
``teacher_ece``          the same for ``p``
``student_accuracy``     fraction of positions where ``argmax q`` is the label (top-1 accuracy,
                         beside the ECE); ``teacher_accuracy`` the same for ``p``
``tokens``               number of counted positions
=======================  ==========================================================================

Teacher metrics are omitted when no teacher logits are given. With several teachers
(:mod:`jkd.train.teachers`) the teacher is their routed mixture, and ``eval/teachers/nll/<i>``
and ``eval/teachers/share/<i>`` give each teacher's NLL and token share.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jkd import losses
from jkd import models
from jkd import partitioning
from jkd.train import sharding
from jkd.train import teachers as teachers_lib

Array = jax.Array
PyTree = Any

ECE_BINS = 15

#: Every metric :func:`eval_metrics` can return (the teacher's need teacher logits).
METRIC_NAMES = ("eval/tokens", "eval/student_nll", "eval/student_ppl", "eval/student_ece",
                "eval/teacher_nll", "eval/teacher_ppl", "eval/teacher_ece", "eval/kl_forward",
                "eval/top1_agreement", "eval/student_accuracy", "eval/teacher_accuracy")


def _calibration_sums(logits: Array, labels: Array, mask: Array, num_bins: int
                      ) -> tuple[Array, Array, Array, Array]:
  """Per-bin counts, confidence sums and correct counts; also the argmax."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  conf = jnp.max(probs, axis=-1)
  pred = jnp.argmax(logits, axis=-1)
  correct = (pred == labels) & mask
  # Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; conf > 0 always.
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32) * mask[..., None]
  count = jnp.sum(onehot, axis=tuple(range(onehot.ndim - 1)))
  conf_sum = jnp.einsum("...b,...->b", onehot, conf)
  correct_sum = jnp.einsum("...b,...->b", onehot, correct.astype(jnp.float32))
  return count, conf_sum, correct_sum, pred


def eval_sums(student_logits: Array, labels: Array, *, teacher_logits: Array | None = None,
              where: Array | None = None, num_bins: int = ECE_BINS) -> dict[str, Array]:
  """Sums over the counted positions of one batch (add them up across batches).

  Args:
    student_logits: ``[batch, seq, vocab]`` student logits (any float dtype; float32 compute).
    labels: ``[batch, seq]`` next-token ids, ``-100`` where no loss is taken.
    teacher_logits: optional ``[batch, seq, vocab]`` teacher logits.
    where: optional ``[batch, seq]`` bool, positions that count (ANDed with the labels').
    num_bins: calibration bins.

  Returns:
    ``{"tokens", "student_nll", "student_bin_count", "student_bin_conf",
    "student_bin_correct"}`` (scalars and ``[num_bins]`` arrays), plus ``teacher_nll``,
    ``teacher_bin_*``, ``kl_forward`` and ``top1_agreement`` sums when a teacher is given;
    :func:`eval_metrics` turns them into metrics.

  >>> z = jnp.zeros((1, 2, 4)); y = jnp.array([[1, -100]])
  >>> s = eval_sums(z, y)
  >>> float(s["tokens"]), round(float(s["student_nll"]), 4)
  (1.0, 1.3863)
  """
  mask = losses.label_mask(labels, where=where)
  safe_labels = jnp.where(mask, labels, 0)
  sums = {"tokens": jnp.sum(mask).astype(jnp.float32)}

  def model_sums(prefix, logits):
    nll = losses.cross_entropy(logits, labels, where=mask)
    count, conf, correct, pred = _calibration_sums(logits, safe_labels, mask, num_bins)
    sums.update({f"{prefix}_nll": jnp.sum(nll), f"{prefix}_bin_count": count,
                 f"{prefix}_bin_conf": conf, f"{prefix}_bin_correct": correct})
    return pred

  student_pred = model_sums("student", student_logits)
  if teacher_logits is not None:
    teacher_pred = model_sums("teacher", teacher_logits)
    kl = losses.forward_kl(student_logits, teacher_logits, where=mask)
    sums["kl_forward"] = jnp.sum(kl)
    sums["top1_agreement"] = jnp.sum((student_pred == teacher_pred) & mask).astype(jnp.float32)
  return sums


def eval_metrics(sums: Mapping[str, Any]) -> dict[str, float]:
  """Metrics (``eval/...``, Python floats) from :func:`eval_sums` accumulated over batches."""
  s = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  n = float(s["tokens"])
  if n == 0:
    raise ValueError("the evaluation data has no counted positions (all labels are -100 or"
                     " masked); check the eval set.")
  out = {"eval/tokens": n}
  for prefix in ("student", "teacher"):
    if f"{prefix}_nll" not in s:
      continue
    nll = float(s[f"{prefix}_nll"]) / n
    out[f"eval/{prefix}_nll"] = nll
    out[f"eval/{prefix}_ppl"] = math.exp(nll) if nll < 700 else math.inf
    gap = np.abs(s[f"{prefix}_bin_correct"] - s[f"{prefix}_bin_conf"])
    out[f"eval/{prefix}_ece"] = float(np.sum(gap)) / n
    out[f"eval/{prefix}_accuracy"] = float(np.sum(s[f"{prefix}_bin_correct"])) / n
  if "kl_forward" in s:
    out["eval/kl_forward"] = float(s["kl_forward"]) / n
    out["eval/top1_agreement"] = float(s["top1_agreement"]) / n
  for key in sorted(k for k in s if k.startswith("teachers/")):  # Several teachers.
    out[f"eval/{key}"] = float(s[key]) / n
  return out


def make_eval_step(*, student_config: models.ModelConfig,
                   teacher_config: models.ModelConfig | tuple | None = None,
                   num_bins: int = ECE_BINS,
                   routing: teachers_lib.Routing | None = None) -> Callable:
  """The pure ``(params, teacher_params, batch, gate_params=None) -> sums`` of one batch (jit
  it).

  ``batch`` holds ``tokens`` and ``labels`` and optionally ``loss_mask``, ``attention_mask``,
  ``positions``, ``segment_ids``; ``teacher_params`` may be None, and a cross-tokenizer batch
  (with ``teacher_tokens``) gets student metrics only. With ``routing`` (several teachers)
  ``teacher_config`` and ``teacher_params`` are tuples, the teacher metrics are the routed
  mixture's (the gate's parameters ``gate_params``), plus each teacher's NLL and share sums.
  """
  def step(params: PyTree, teacher_params: PyTree | None, batch: Mapping[str, Any],
           gate_params: PyTree | None = None) -> dict[str, Array]:
    common = dict(attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
                  segment_ids=batch.get("segment_ids"))
    out = models.apply(params, batch["tokens"], config=student_config, **common)
    student, teacher, extra = out.logits, None, {}
    # A cross-tokenizer batch (``teacher_tokens``) has no shared vocabulary to compare the
    # distributions over: student metrics only.
    if teacher_params is not None and "teacher_tokens" not in batch:
      if routing is None:
        teacher = models.apply(teacher_params, batch["tokens"], config=teacher_config,
                               **common).logits
      else:
        mask = losses.label_mask(batch["labels"], where=batch.get("loss_mask"))
        routed = teachers_lib.routed_teacher_inputs(
            teacher_params, teacher_config, batch, routing=routing, student_hidden=out.hidden,
            mask=mask, student_vocab=student_config.vocab_size, gate_params=gate_params)
        teacher, extra = routed["teacher_logits"], teachers_lib.eval_sums(routed, mask)
    sums = eval_sums(student, batch["labels"], teacher_logits=teacher,
                     where=batch.get("loss_mask"), num_bins=num_bins)
    return {**sums, **extra}

  return step


def evaluate_batches(eval_step: Callable, params: PyTree, teacher_params: PyTree | None,
                     batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """Runs ``eval_step`` (jitted) over ``batches`` and returns :func:`eval_metrics` of the sums.

  The sums stay on the device until the last batch; one transfer at the end.
  """
  total = None
  for batch in batches:
    sums = eval_step(params, teacher_params, batch)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    raise ValueError("evaluate_batches() got no batches; the eval set is smaller than one"
                     " batch.")
  return eval_metrics(jax.device_get(total))


class Evaluator:
  """The jitted eval step over ``source.one_epoch()`` (at most ``max_batches``; 0: all), batches
  placed by a :class:`jkd.train.sharding.BatchPlacer`; metrics named ``<prefix><name>``."""

  def __init__(self, source, batches, *, student_config, teacher, params_shardings,
               replicated, max_batches: int, prefix: str = "eval/",
               routing: teachers_lib.Routing | None = None):
    self.source, self.batches, self.max_batches = source, batches, max_batches
    self.prefix = prefix
    self.teacher = teacher  # With teacher.online=False its params are None: student metrics.
    self.routing = routing if teacher.params is not None else None  # Several teachers.
    self._step = make_eval_step(
        student_config=student_config,
        teacher_config=teacher.config if teacher.params is not None else None,
        routing=self.routing)
    self._shardings = (params_shardings, replicated)
    self._compiled = None

  def __call__(self, params, term_params=None) -> dict[str, float] | None:
    """The metrics of ``params`` (``term_params``: the state's, holding the teachers' gate)."""
    if self.source is None:
      return None
    gate = (term_params or {}).get(teachers_lib.GATE) if self.routing is not None else None
    local = self.source.one_epoch()
    if self.max_batches > 0:
      local = itertools.islice(local, self.max_batches)
    first = next(local, None)
    if first is None:
      raise ValueError("the eval set is smaller than one batch.")
    shardings = self.batches.shardings(first)
    if self._compiled is None:
      params_shardings, replicated = self._shardings

      def traced(*args):  # Activations pinned to the run's mesh, as in the train step.
        with partitioning.activation_sharding(replicated.mesh, sharding.DEFAULT_RULES):
          return self._step(*args)

      self._compiled = jax.jit(traced, out_shardings=replicated, in_shardings=(
          params_shardings, self.teacher.shardings, shardings, replicated))

    def checked(b):
      teachers_lib.check_batch(b, self.routing, what="the eval data")
      return self.batches.place(b, shardings)

    placed = (checked(b) for b in itertools.chain([first], local))
    metrics = evaluate_batches(lambda p, t, b: self._compiled(p, t, b, gate), params,
                               self.teacher.params, placed)
    return {self.prefix + k.split("/", 1)[1]: v for k, v in metrics.items()}
