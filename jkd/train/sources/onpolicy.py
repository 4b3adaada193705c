"""On-policy distillation: batch sources that put the student's own samples into the batches.

Both wrap any batch source (``__next__``, ``get_state``/``set_state``) of language-model batches
(``tokens``, ``labels``, optionally ``loss_mask`` and ``attention_mask``, all ``[B, T]``) and are
driven by :func:`jkd.train.train`, which gives them the current student before each batch
(``before_batch(params)``) and the eval metrics after each evaluation
(``after_eval(metrics, params)``; :class:`jkd.data.BatchSource`).
The teacher then scores whatever completions the batch holds inside the step, with the
configured divergence, as for any batch.

- :class:`OnPolicySource` (GKD, Agarwal et al., *On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes*, ICLR 2024): with probability ``lmbda`` a batch's
  completions are replaced by the student's samples.
- :class:`AdaptiveOffPolicySource` (DistiLLM, Ko et al., *DistiLLM: Towards Streamlined
  Distillation for Large Language Models*, ICML 2024): a share ``p`` of each batch's rows are
  student samples, replayed from a FIFO :class:`ReplayBuffer` of earlier samples (off-policy) or
  generated fresh; ``p`` starts at 0 and grows by ``p_step`` whenever the validation loss fails
  to improve.

A student sample for a row: the prompt is the row's tokens up to and including its first loss
position (the position predicting the first completion token; padding excluded when the batch
has an ``attention_mask``), the student continues it with :func:`jkd.sampling.generate`, and
the row becomes prompt + sample, right-padded with ``pad_id`` to the batch's ``T``; the labels
(and ``loss_mask``) cover the sampled tokens, the stop token included; a sample that does not
fit in ``T`` is truncated. Rows without a loss position are left as they are.

Every random choice is drawn from ``fold_in(key(seed), batch_index)`` (the coin from
``fold_in(., 0)``, the sampling key from ``fold_in(., 1)``; the rows and buffer entries of a
replay from NumPy's generator seeded ``[seed, batch_index]``), so a resumed run, whose
parameters and source state are restored, draws exactly the batches of an uninterrupted one.
The batch carries ``metric/onpolicy/fraction`` (share of the batches so far that held student
samples), ``metric/onpolicy/rows`` (share of this batch's rows that are student samples) and,
for DistiLLM, ``metric/onpolicy/p``; the step logs them as ``onpolicy/...``.

Sampling runs on one process: multi-process runs are not supported yet (a ``ValueError``).
"""

from __future__ import annotations

import collections
import contextlib
import numbers
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from jkd import models
from jkd import partitioning
from jkd import sampling
from jkd.data.source import BatchSource, as_batch_source
from jkd.losses import IGNORE_INDEX
from jkd.train import sharding

PyTree = Any

#: Batch fields the sources rewrite; any other ``[B, T]`` field (positions, segment ids, a cached
#: teacher) would describe the original completion, and is an error. ``[B]`` fields (an
#: example's ``domain``, which routes it to its teacher) describe the prompt, which a sample
#: keeps: they stay with their row (and are replayed with it).
REWRITTEN = ("tokens", "labels", "loss_mask", "attention_mask")
_METRIC = "metric/onpolicy/"


def row_fields(batch: Mapping[str, np.ndarray]) -> list[str]:
  """The batch's per-example ``[B]`` fields that are not metrics (e.g. ``domain``)."""
  return sorted(k for k, v in batch.items()
                if k not in REWRITTEN and not k.startswith("metric/") and np.ndim(v) == 1)


def _check_batch(batch: Mapping[str, np.ndarray]) -> None:
  other = sorted(k for k in batch if k not in REWRITTEN and not k.startswith("metric/")
                 and k not in row_fields(batch))
  if other:
    raise ValueError(f"on-policy sources rewrite {list(REWRITTEN)} with student samples; the"
                     f" batch also has {other}, which would no longer match the completions:"
                     " drop them from the data, or turn onpolicy.mode off.")
  if "tokens" not in batch or "labels" not in batch:
    raise ValueError(f"on-policy sources need 'tokens' and 'labels'; the batch has"
                     f" {sorted(batch)}.")


def _number(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      (low < value if low_open else low <= value) and value <= high):
    interval = f"{'(' if low_open else '['}{low}, {high}]"
    raise ValueError(f"{name} must be a number in {interval} (got {value!r}).")
  return float(value)


def batch_prompts(batch: Mapping[str, np.ndarray]) -> list[list[int] | None]:
  """Each row's prompt: its tokens up to and including the first loss position (real tokens
  only when the batch has an ``attention_mask``); None for a row without a loss position.

  >>> batch_prompts({"tokens": np.array([[5, 6, 7, 8]]), "labels": np.array([[-100, 7, 8, 9]])})
  [[5, 6]]
  """
  tokens, labels = np.asarray(batch["tokens"]), np.asarray(batch["labels"])
  counted = labels != IGNORE_INDEX
  if "loss_mask" in batch:
    counted &= np.asarray(batch["loss_mask"], bool)
  mask = np.asarray(batch.get("attention_mask", np.ones_like(tokens)), bool)
  out = []
  for row in range(tokens.shape[0]):
    hits = np.flatnonzero(counted[row])
    prompt = tokens[row, :hits[0] + 1][mask[row, :hits[0] + 1]] if hits.size else None
    out.append(None if prompt is None or not prompt.size else prompt.tolist())
  return out


def write_sample(batch: dict[str, np.ndarray], row: int, prompt: list[int],
                 sample: np.ndarray, *, pad_id: int) -> None:
  """Makes ``batch[row]`` the ``prompt`` followed by ``sample`` (in place; see the module
  docstring for the layout)."""
  t = batch["tokens"].shape[1]
  n = len(prompt)
  sample = np.asarray(sample)[:t - n + 1]  # The last label sits at position n - 1 + len - 1.
  fit = min(len(sample), t - n)
  tokens = np.full(t, pad_id, batch["tokens"].dtype)
  tokens[:n], tokens[n:n + fit] = prompt, sample[:fit]
  labels = np.full(t, IGNORE_INDEX, batch["labels"].dtype)
  labels[n - 1:n - 1 + len(sample)] = sample
  batch["tokens"][row], batch["labels"][row] = tokens, labels
  if "loss_mask" in batch:
    batch["loss_mask"][row] = labels != IGNORE_INDEX
  if "attention_mask" in batch:
    batch["attention_mask"][row] = np.arange(t) < n + fit


class OnPolicySource(BatchSource):
  """GKD's batch source: with probability ``lmbda`` a batch's completions are the student's.

  Args:
    source: the wrapped source of language-model batches.
    student_config: the student's :class:`jkd.models.ModelConfig`.
    seed: seed of the coins and the sampling keys.
    lmbda: probability that a batch is on-policy (GKD's lambda; 0.5).
    temperature, top_p: sampling options (0.9, 1.0).
    max_new_tokens: most sampled tokens per row (128; at most the batch's ``T`` are used).
    eos_id: the student stops after this token (None: after ``max_new_tokens``).
    pad_id: token written after a sample.

  Call :meth:`before_batch` with the current student parameters before each ``next()``
  (:func:`jkd.train.train` does).
  """

  def __init__(self, source, *, student_config: models.ModelConfig, seed: int = 0,
               lmbda: float = 0.5, temperature: float = 0.9, max_new_tokens: int = 128,
               top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0):
    self.source = as_batch_source(source)
    self.student_config, self.seed = student_config, int(seed)
    self.lmbda = _number("lmbda", lmbda, 0.0, 1.0)
    self.temperature = _number("temperature", temperature, 0.0, float("inf"), low_open=True)
    self.top_p = _number("top_p", top_p, 0.0, 1.0, low_open=True)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or (
        max_new_tokens < 1):
      raise ValueError(f"max_new_tokens must be an int >= 1 (got {max_new_tokens!r}).")
    self.max_new_tokens = int(max_new_tokens)
    self.eos_id = None if eos_id is None or eos_id < 0 else int(eos_id)
    self.pad_id = int(pad_id)
    self._params: PyTree | None = None
    self._index = 0          # Batches served.
    self._with_samples = 0   # Batches served that held student samples.

  # The engine's hooks. -------------------------------------------------------------------------

  def bind_models(self, **models_) -> None:
    self.source.bind_models(**models_)

  def before_batch(self, params: PyTree) -> None:
    """The student parameters the next batch samples from (any sharding)."""
    self._params = params
    self.source.before_batch(params)

  def after_eval(self, metrics: Mapping[str, float], params: PyTree) -> None:
    """Eval metrics after an evaluation (GKD ignores them; the wrapped source gets them)."""
    self.source.after_eval(metrics, params)

  # Randomness. ---------------------------------------------------------------------------------

  def _key(self, index: int, purpose: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), index), purpose)

  def coin(self, index: int) -> float:
    """The uniform draw that decides batch ``index`` (on-policy when below ``lmbda``)."""
    return float(jax.random.uniform(self._key(index, 0)))

  def sample_key(self, index: int) -> jax.Array:
    """The :func:`jkd.sampling.generate` key of batch ``index``."""
    return self._key(index, 1)

  def sample(self, prompts: list[list[int]], index: int, seq_len: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """The student's samples ``([n, max_new] tokens, [n] lengths)`` for ``prompts``."""
    if self._params is None:
      raise ValueError("an on-policy batch needs the student: call before_batch(params) before"
                       " next() (jkd.train.train does).")
    mesh = getattr(getattr(jax.tree.leaves(self._params)[0], "sharding", None), "mesh", None)
    context = (partitioning.activation_sharding(mesh, sharding.DEFAULT_RULES)
               if isinstance(mesh, jax.sharding.Mesh) else contextlib.nullcontext())
    with context:  # Traced on the student's mesh: batch-sharded prefill, decode and KV cache.
      out = sampling.generate(self._params, prompts, config=self.student_config,
                              key=self.sample_key(index),
                              max_new_tokens=min(self.max_new_tokens, seq_len),
                              temperature=self.temperature, top_p=self.top_p,
                              eos_id=self.eos_id, pad_id=self.pad_id, bucket=seq_len)
    return np.asarray(out.tokens), np.asarray(out.lengths)

  def _generate_rows(self, batch: dict[str, np.ndarray], rows, index: int) -> list[int]:
    """Replaces ``rows`` of ``batch`` with student samples; returns the rows replaced."""
    prompts = batch_prompts(batch)
    rows = [r for r in rows if prompts[r] is not None]
    if rows:
      tokens, lengths = self.sample([prompts[r] for r in rows], index, batch["tokens"].shape[1])
      for r, toks, n in zip(rows, tokens, lengths):
        write_sample(batch, r, prompts[r], toks[:n], pad_id=self.pad_id)
    return rows

  # Batches. ------------------------------------------------------------------------------------

  def _student_rows(self, batch: dict[str, np.ndarray], index: int) -> list[int]:
    if self.coin(index) < self.lmbda:
      return self._generate_rows(batch, range(batch["tokens"].shape[0]), index)
    return []

  def _metrics(self, batch: dict[str, np.ndarray], rows: list[int]) -> None:
    b = batch["tokens"].shape[0]
    flag = np.zeros(b, np.float32)
    flag[rows] = 1.0
    batch[_METRIC + "rows"] = flag
    batch[_METRIC + "fraction"] = np.full(b, self._with_samples / self._index, np.float32)

  def __next__(self) -> dict[str, np.ndarray]:
    base = next(self.source)
    _check_batch(base)
    batch = {k: np.array(v) for k, v in base.items()}
    index = self._index
    rows = self._student_rows(batch, index)
    self._index += 1
    self._with_samples += bool(rows)
    self._metrics(batch, rows)
    return batch

  def one_epoch(self) -> Iterator[dict[str, np.ndarray]]:
    """The wrapped source's epoch (evaluation data is never rewritten)."""
    return self.source.one_epoch()

  def get_state(self) -> dict[str, Any]:
    """The wrapped source's state and the number of batches served (JSON-serialisable)."""
    return {"source": self.source.get_state(), "index": self._index,
            "with_samples": self._with_samples}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes at the batch after the one :meth:`get_state` was taken after."""
    if "source" not in state or "index" not in state:
      raise ValueError(f"the checkpoint's data state {sorted(state)} is not an on-policy"
                       " source's: resume with the same onpolicy.mode, or start a new workdir.")
    self.source.set_state(state["source"])
    self._index, self._with_samples = int(state["index"]), int(state["with_samples"])


class ReplayBuffer:
  """A FIFO buffer of student-sampled rows (DistiLLM's replay buffer), JSON-checkpointable.

  Args:
    capacity: most rows kept; the oldest go first (1000).

  >>> buf = ReplayBuffer(2)
  >>> buf.add({"tokens": np.array([[1, 2], [3, 4], [5, 6]])})
  >>> len(buf), buf.take([0])["tokens"].tolist()
  (2, [[3, 4]])
  """

  def __init__(self, capacity: int = 1000):
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
      raise ValueError(f"the replay buffer's capacity must be an int >= 1 (got {capacity!r}).")
    self.capacity = int(capacity)
    self._rows: collections.deque = collections.deque(maxlen=self.capacity)

  def __len__(self) -> int:
    return len(self._rows)

  def add(self, rows: Mapping[str, np.ndarray]) -> None:
    """Appends rows ``{field: [n, T]}`` (dropping the oldest beyond the capacity)."""
    names = sorted(rows)
    for i in range(len(rows[names[0]])):
      self._rows.append({k: np.asarray(rows[k][i]) for k in names})

  def take(self, indices) -> dict[str, np.ndarray]:
    """Rows ``indices`` (0 is the oldest) as ``{field: [n, T]}``."""
    picked = [self._rows[int(i)] for i in indices]
    return {k: np.stack([r[k] for r in picked]) for k in picked[0]}

  def get_state(self) -> dict[str, Any]:
    """The rows as lists (JSON: sized for CPU runs; about 6 bytes per token)."""
    return {"capacity": self.capacity,
            "rows": [{k: v.tolist() for k, v in r.items()} for r in self._rows],
            "dtypes": {k: str(v.dtype) for k, v in (self._rows[0].items() if self._rows else ())}}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if int(state["capacity"]) != self.capacity:
      raise ValueError(f"the checkpoint's replay buffer has capacity {state['capacity']}, this"
                       f" run {self.capacity}: resume with the same onpolicy.buffer_size.")
    dtypes = state.get("dtypes", {})
    self._rows.clear()
    for r in state["rows"]:
      self._rows.append({k: np.asarray(v, dtypes.get(k)) for k, v in r.items()})


class AdaptiveOffPolicySource(OnPolicySource):
  """DistiLLM's adaptive off-policy source: a share ``p`` of each batch's rows are student
  samples, replayed from a :class:`ReplayBuffer` or generated fresh.

  Per batch, ``k = round(p * B)`` rows (drawn at random) become student samples. With
  probability ``lmbda`` (the coin), or when the buffer holds fewer than ``k`` rows, they are
  sampled fresh from the current student and added to the buffer; otherwise ``k`` rows drawn at
  random from the buffer replace them (samples of earlier students: off-policy). ``p`` starts
  at 0; after each evaluation, when ``metric`` is not lower than at the previous evaluation,
  ``p`` grows by ``p_step`` (at most 1). In DistiLLM's terms ``1 - lmbda`` is the replay ratio
  and ``p`` the adaptive probability of student-generated outputs.

  Args:
    source, student_config, seed, lmbda, temperature, max_new_tokens, top_p, eos_id, pad_id:
      as :class:`OnPolicySource`.
    buffer_size: the replay buffer's capacity (1000).
    p_step: growth of ``p`` when the validation loss fails to improve (0.1).
    metric: the validation loss, an eval metric (``eval/kl_forward``).
  """

  def __init__(self, source, *, buffer_size: int = 1000, p_step: float = 0.1,
               metric: str = "eval/kl_forward", **options):
    super().__init__(source, **options)
    self.buffer = ReplayBuffer(buffer_size)
    self.p_step = _number("p_step", p_step, 0.0, 1.0, low_open=True)
    self.metric = str(metric)
    self.p = 0.0
    self._last: float | None = None

  def after_eval(self, metrics: Mapping[str, float], params: PyTree) -> None:
    """Grows ``p`` by ``p_step`` when ``metric`` did not improve on the previous evaluation."""
    super().after_eval(metrics, params)
    if self.metric not in metrics:
      raise ValueError(f"onpolicy.metric {self.metric!r} is not among the eval metrics"
                       f" {sorted(metrics)}.")
    value = float(metrics[self.metric])
    if self._last is not None and not value < self._last:
      self.p = min(1.0, round(self.p + self.p_step, 12))
    self._last = value

  def _student_rows(self, batch: dict[str, np.ndarray], index: int) -> list[int]:
    b = batch["tokens"].shape[0]
    k = int(round(self.p * b))
    if k == 0:
      return []
    rng = np.random.default_rng([self.seed, index])
    rows = sorted(rng.permutation(b)[:k].tolist())
    kept = [name for name in REWRITTEN if name in batch] + row_fields(batch)
    if self.coin(index) < self.lmbda or len(self.buffer) < k:
      rows = self._generate_rows(batch, rows, index)
      self.buffer.add({name: batch[name][rows] for name in kept})
      return rows
    replay = self.buffer.take(rng.integers(len(self.buffer), size=k))
    fields = sorted(kept)
    if sorted(replay) != fields:
      raise ValueError(f"replayed rows have {sorted(replay)} but the batch has {fields}.")
    for name in fields:
      batch[name][rows] = replay[name]
    return rows

  def _metrics(self, batch: dict[str, np.ndarray], rows: list[int]) -> None:
    super()._metrics(batch, rows)
    batch[_METRIC + "p"] = np.full(batch["tokens"].shape[0], self.p, np.float32)

  def get_state(self) -> dict[str, Any]:
    """Also ``p``, the last validation loss and the buffer's rows (JSON)."""
    return {**super().get_state(), "p": self.p, "last_metric": self._last,
            "buffer": self.buffer.get_state()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "buffer" not in state:
      raise ValueError("the checkpoint's data state has no replay buffer: resume with the same"
                       " onpolicy.mode, or start a new workdir.")
    super().set_state(state)
    self.p = float(state["p"])
    self._last = None if state["last_metric"] is None else float(state["last_metric"])
    self.buffer.set_state(state["buffer"])


def _sampling_options(cfg, student_config) -> dict[str, Any]:
  o = cfg.onpolicy
  return dict(student_config=student_config, seed=int(cfg.seed), lmbda=o.lmbda,
              temperature=o.temperature, max_new_tokens=int(o.max_new_tokens), top_p=o.top_p,
              eos_id=int(o.eos_id), pad_id=int(o.pad_id))


def _gkd(cfg, source, student_config):
  return OnPolicySource(source, **_sampling_options(cfg, student_config))


def _distillm(cfg, source, student_config):
  o = cfg.onpolicy
  return AdaptiveOffPolicySource(source, **_sampling_options(cfg, student_config),
                                 buffer_size=int(o.buffer_size), p_step=o.p_step,
                                 metric=o.metric)


#: ``onpolicy.mode`` -> ``(cfg, source, student_config) -> wrapped source``.
ONPOLICY_MODES: dict[str, Callable[[Any, Any, models.ModelConfig], OnPolicySource]] = {
    "gkd": _gkd,
    "distillm": _distillm,
}


def wrap_source(cfg, source, student_config: models.ModelConfig):
  """The train source wrapped for ``cfg.onpolicy.mode`` (returned as is when the mode is
  ``""``)."""
  mode = cfg.onpolicy.mode if "onpolicy" in cfg else ""
  if not mode:
    return source
  if mode not in ONPOLICY_MODES:
    raise ValueError(f"unknown onpolicy.mode {mode!r}; choose one of {sorted(ONPOLICY_MODES)}"
                     " or '' (off).")
  if jax.process_count() > 1:
    raise ValueError(f"onpolicy.mode={mode!r} samples on one process; multi-process on-policy"
                     " runs are not supported yet.")
  return ONPOLICY_MODES[mode](cfg, source, student_config)
