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
    TrainState,
    flops_per_token,
    init_state,
    make_optimizer,
    make_train_step,
    model_inputs,
    step_flops,
)
