"""A tiny 2-layer model of vocabulary 128 shared by the recipe and preference tests, with the
float64 NumPy log-softmax of its logits (each row run alone) for reference values."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jkd import models


class TinyModel:
  """``config``, ``init(key) -> params``, ``logits(params, tokens)`` (jitted) of a tiny model."""

  def __init__(self, max_position_embeddings: int = 64):
    self.config = models.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                     num_layers=2, num_heads=4, num_kv_heads=2,
                                     max_position_embeddings=max_position_embeddings)
    self.init = jax.jit(functools.partial(models.init_params, self.config))
    config = self.config
    self.logits = jax.jit(lambda params, tokens: models.apply(params, tokens,
                                                              config=config).logits)

  def np_logsoftmax(self, params, tokens) -> np.ndarray:
    """``[N, T, V]`` float64 log-softmax, each row run alone."""
    z = np.stack([np.asarray(self.logits(params, jnp.asarray(r[None]))[0], np.float64)
                  for r in tokens])
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  def np_token_logprobs(self, params, tokens, labels) -> np.ndarray:
    """``[N, T]`` float64 log p(label), each row run alone."""
    return np.take_along_axis(self.np_logsoftmax(params, tokens), labels[..., None], -1)[..., 0]
