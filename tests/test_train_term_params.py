"""Loss terms in the engine: inputs from each term's declared ``needs``, trainable term params.

* ``configs/hidden_kd.py:cpu``: hidden-state distillation from a 128-wide teacher into a 64-wide
  student; the ``[64, 128]`` projections live in the train state, train, and are checkpointed.
* A loss term registered in user code (the config file) with hidden-state ``needs`` trains end to
  end through the command line and receives the per-layer hidden states of both models.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp

from jkd import losses
from jkd.train import build, stages
from jkd.train.writer import read_metrics
from recipe_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_load_config = load_config


def test_hidden_state_distillation_across_widths_trains_its_projections(tmp_path):
  cfg = _load_config("hidden_kd", "cpu")
  cfg.checkpoint.update(dict(every=2, keep=2))
  cfg.lock()
  workdir = str(tmp_path / "run")
  result = stages.run(cfg, workdir)
  assert result["status"] == "done" and result["step"] == cfg.train.steps
  lines = [m for m in read_metrics(workdir) if "loss/hidden" in m]
  assert len(lines) == cfg.train.steps
  assert all(math.isfinite(m["loss/hidden"]) and m["loss/hidden"] > 0 for m in lines)

  # The projections as the run created them: one [64, 128] matrix per mapped layer pair.
  objective = losses.build_objective(cfg.objective)
  teacher = build.teacher_spec(cfg).config
  student = build.student_config(cfg, teacher)
  assert (student.hidden_size, teacher.hidden_size) == (64, 128)
  initial = build.term_params(objective, jax.random.fold_in(jax.random.key(cfg.seed), 3),
                              student, teacher)
  assert initial["hidden"].shape == (2, 64, 128)

  # The checkpoint holds them, trained (moved from their initial values).
  state_dir = os.path.join(workdir, "checkpoints", str(cfg.train.steps), "state")
  item = {"term_params": {"hidden": jax.ShapeDtypeStruct((2, 64, 128), np.float32)}}
  with ocp.PyTreeCheckpointer() as ckptr:
    stored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  moved = np.abs(np.asarray(stored["term_params"]["hidden"]) - np.asarray(initial["hidden"]))
  assert moved.max() > 1e-5

  # Resuming restores them with the rest of the state: two more steps continue the run.
  cfg2 = _load_config("hidden_kd", "cpu")
  cfg2.train.steps = cfg.train.steps + 2
  cfg2.checkpoint.update(dict(every=2, keep=2))
  assert stages.run(cfg2, workdir, allow_config_change=["train.steps"])["step"] == (
      cfg.train.steps + 2)


_USER_CONFIG = textwrap.dedent('''
    """A user's own loss term, registered in the config file: cosine distance between the
    student's last hidden layer and the teacher's (the per-layer states, by declared needs).

      python -m jkd.train --config user_term.py --workdir DIR
    """
    import jax.numpy as jnp

    from jkd import losses
    from jkd.train import recipes

    if "last_layer_cosine" not in losses.LOSS_TERMS:
      @losses.register_loss_term("last_layer_cosine",
                                 needs=(("student_hiddens", "teacher_hiddens"),))
      def last_layer_cosine(inputs, *, eps=1e-6):
        s = inputs["student_hiddens"][-1]   # [B, T, H]: the models ran with hidden states
        t = inputs["teacher_hiddens"][-1]
        cos = (s * t).sum(-1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + eps)
        mask = losses.token_mask(inputs)
        return losses.masked_mean(1.0 - cos, mask), {"layers": jnp.float32(
            inputs["student_hiddens"].shape[0])}


    def get_config(arg=None):
      c = recipes.cpu_variant(recipes.smollm2_config(
          {"kd": {"term": "forward_kl"}, "mine": {"term": "last_layer_cosine", "weight": 0.5}}),
          steps=3)
      c.report.enabled = False
      return c
''')


def test_a_user_registered_hidden_state_term_trains_through_the_cli(tmp_path):
  config = tmp_path / "user_term.py"
  config.write_text(_USER_CONFIG)
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "jkd.train", f"--config={config}",
                           f"--workdir={workdir}"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "done at step 3" in result.stdout
  lines = [m for m in read_metrics(str(workdir)) if "loss/mine" in m]
  assert [m["step"] for m in lines] == [1, 2, 3]
  for m in lines:
    # The student (every 2nd of the 4 teacher layers) returned its 2 layers' states.
    assert m["mine/layers"] == 2.0
    assert 0.0 < m["loss/mine"] < 2.0 and math.isfinite(m["loss/kd"])
    np.testing.assert_allclose(m["loss/total"], m["loss/kd"] + 0.5 * m["loss/mine"], rtol=1e-5)
  with open(workdir / "config.json") as f:
    assert json.load(f)["objective"]["mine"]["term"] == "last_layer_cosine"
