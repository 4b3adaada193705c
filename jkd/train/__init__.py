"""jkd.train: sharding, the train state and step, checkpoints, and the training loop."""

from jkd.train.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    shardings_for,
    state_shardings,
)
from jkd.train.step import (
    METRIC_PREFIX,
    TrainState,
    batch_metrics,
    batch_work,
    check_teacher_free,
    flops_per_token,
    init_state,
    make_optimizer,
    make_train_step,
    model_inputs,
    step_flops,
)
from jkd.train.build import STUDENT_SOURCES, TEACHER_SOURCES
from jkd.train.checkpoint import CheckpointError, Checkpointer, find_checkpoint, restore_params
from jkd.train.config import default_config
from jkd.train.data import (
    DATA_SOURCES,
    TOKENIZER_SOURCES,
    ArraySource,
    UnpairedSource,
    make_sources,
    synthetic_lm_examples,
    synthetic_pair_examples,
    tokenizer_for,
)
from jkd.train.evaluate import (
    ECE_BINS,
    METRIC_NAMES,
    eval_metrics,
    eval_sums,
    evaluate_batches,
    make_eval_step,
)
from jkd.train.preference_step import (
    completion_tokens,
    is_preference_batch,
    mismatched_pairs,
    preference_inputs,
)
from jkd.train.onpolicy import (
    ONPOLICY_MODES,
    AdaptiveOffPolicySource,
    OnPolicySource,
    ReplayBuffer,
    wrap_source,
)
from jkd.train.loop import NonFiniteError, initialize_distributed, train
from jkd.train.writer import MetricsWriter, read_metrics
from jkd.train.monitor import Verdict, assess, assess_history, fit_power_law
from jkd.train.report import summarize, write_report
from jkd.train.rounds import RoundPairsSource
from jkd.train.selection import DDKSource, SelectedSource
from jkd.train.stages import run, split_prompts
