"""Run infrastructure shared by training and sampling: the device mesh and batch policy (`mesh`), orbax
checkpoints (`checkpoint`), the run directory's config.json (`rundir`), building the model, schedule and
data a config describes (`build`), drawing images (`generate`) and writing them (`images`).

Training (`jdiff.training`) imports this package; nothing here imports `jdiff.training`, so loading a run
for sampling never does.
"""

from jdiff.run.build import (
    TOKENIZER_DIR,
    TextSetup,
    build_model,
    build_run_model,
    build_schedule,
    build_source,
    captioned_source,
    model_num_classes,
    run_tokenizer,
)
from jdiff.run.checkpoint import Checkpointer, CheckpointError, load_for_inference, load_params, restore_subtree
from jdiff.run.generate import (
    CompileStats,
    Generator,
    Settings,
    auto_batch,
    enable_compilation_cache,
    labels_for,
    tokens_for,
)
from jdiff.run.images import NpzStream, image_grid, sample_path, save_png, upscale_for, write_trajectory
from jdiff.run.mesh import (
    batch_sharding,
    check_batch_size,
    local_copy,
    make_mesh,
    maybe_initialize_distributed,
    replicated,
)
from jdiff.run.rundir import RunError, RunInfo, check_same_run, load_run_config, open_run, save_run_config, workdir_lock

__all__ = [
    "TextSetup",
    "TOKENIZER_DIR",
    "captioned_source",
    "run_tokenizer",
    "build_model",
    "build_run_model",
    "build_schedule",
    "build_source",
    "model_num_classes",
    "Checkpointer",
    "CheckpointError",
    "load_for_inference",
    "load_params",
    "restore_subtree",
    "Generator",
    "Settings",
    "CompileStats",
    "auto_batch",
    "enable_compilation_cache",
    "labels_for",
    "tokens_for",
    "image_grid",
    "save_png",
    "sample_path",
    "upscale_for",
    "NpzStream",
    "write_trajectory",
    "make_mesh",
    "batch_sharding",
    "replicated",
    "local_copy",
    "check_batch_size",
    "maybe_initialize_distributed",
    "RunInfo",
    "RunError",
    "open_run",
    "save_run_config",
    "load_run_config",
    "check_same_run",
    "workdir_lock",
]
