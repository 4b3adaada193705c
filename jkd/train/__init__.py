"""jkd.train: sharding, the train state and step, checkpoints, and the training loop.

The public names below are imported from their modules on first use, so importing one module
(``jkd.train.config`` from a config file, say) loads only what that module needs.
"""

from jkd._lazy import lazy_exports

#: Public name -> the module of ``jkd.train`` that defines it.
_EXPORTS = {
    "DEFAULT_RULES": "sharding", "MESH_AXES": "sharding", "batch_sharding": "sharding",
    "logical_to_spec": "sharding", "make_mesh": "sharding", "shardings_for": "sharding",
    "state_shardings": "sharding",
    "METRIC_PREFIX": "step", "TrainState": "step", "batch_metrics": "step", "batch_work": "step",
    "check_teacher_free": "step", "flops_per_token": "step", "init_state": "step",
    "make_optimizer": "step", "make_train_step": "step", "model_inputs": "step",
    "step_flops": "step",
    "STUDENT_SOURCES": "build", "TEACHER_SOURCES": "build",
    "CheckpointError": "jkd.errors", "Checkpointer": "checkpoint",
    "find_checkpoint": "checkpoint", "restore_params": "checkpoint",
    "default_config": "config", "add_sections": "config",
    "DATA_SOURCES": "sources", "teacher_model_spec": "build", "make_sources": "sources",
    "UnpairedSource": "sources.pairs", "tokenizer_for": "build",
    "ECE_BINS": "evaluate", "METRIC_NAMES": "evaluate", "eval_metrics": "evaluate",
    "eval_sums": "evaluate", "evaluate_batches": "evaluate", "make_eval_step": "evaluate",
    "completion_tokens": "preference_step", "is_preference_batch": "preference_step",
    "mismatched_pairs": "preference_step", "preference_inputs": "preference_step",
    "ONPOLICY_MODES": "sources.onpolicy", "AdaptiveOffPolicySource": "sources.onpolicy",
    "OnPolicySource": "sources.onpolicy", "ReplayBuffer": "sources.onpolicy",
    "wrap_source": "sources.onpolicy",
    "NonFiniteError": "jkd.errors", "initialize_distributed": "distributed", "train": "loop",
    "CheckpointMismatchError": "jkd.errors", "ConfigChangedError": "jkd.errors",
    "SaveError": "jkd.errors",
    "check_resume": "loop",
    "Run": "setup",
    "MetricsWriter": "writer", "read_metrics": "writer",
    "Verdict": "monitor", "assess": "monitor", "assess_history": "monitor",
    "fit_power_law": "monitor",
    "summarize": "report", "write_report": "report",
    "RoundPairsSource": "sources.rounds",
    "QCRDSource": "sources.qcrd", "SelfImitationSource": "sources.self_imitation",
    "DDKSource": "sources.ddk", "SelectedSource": "sources.miniplm",
    "run": "stages", "split_prompts": "sources.corpus", "prepare_arte": "sources.arte",
    "greedy_answers": "answers", "judge_nll": "answers", "rouge_l": "answers",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
