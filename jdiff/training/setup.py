"""Everything a training run needs before its first step, built once from a `TrainConfig`: the mesh, data
source, model, schedule, optimizer, the jitted init and step functions, and the batch iterator. The loop,
`benchmarks/train_throughput.py` and the tests all start from `setup(config)`."""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax

import jdiff
from jdiff._logs import one_line
from jdiff.config import ConfigError, TrainConfig
from jdiff.run import (
    Checkpointer,
    CheckpointError,
    batch_sharding,
    build_model,
    build_schedule,
    build_source,
    check_batch_size,
    make_mesh,
    model_num_classes,
    replicated,
)
from jdiff.training.optim import make_optimizer
from jdiff.training.state import TrainState, init_train_state
from jdiff.training.step import make_step_fn


@dataclasses.dataclass
class Setup:
    """The parts of a run. `schedule` is replicated over `mesh`; `abstract_state` holds the state's shapes,
    dtypes and shardings (the restore target); `step_fn(state, batch, schedule, acc) -> (state, acc)` is the
    compiled, sharded train step."""

    config: TrainConfig
    mesh: Any
    source: Any
    model: Any
    schedule: Any
    tx: Any
    num_classes: Optional[int]
    image_shape: tuple[int, int, int]
    init_fn: Any
    abstract_state: Any
    step_fn: Any

    def derived(self) -> dict[str, Any]:
        """Facts config.json records beside the config."""
        return {
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "dataset_size": len(self.source),
            "jdiff_version": jdiff.__version__,
        }

    def restore_or_init(self, ckpt: Checkpointer, log=lambda s: None) -> TrainState:
        """The latest checkpoint's state in `ckpt`, or the initial state when there is none."""
        latest = ckpt.latest_step()
        if latest is None:
            return self.init_fn()
        state = ckpt.restore(self.abstract_state, latest)
        if int(state.step) != latest:
            raise CheckpointError(f"checkpoint {latest} in {ckpt.directory} holds step {int(state.step)}")
        log(f"resumed from checkpoint step {latest} in {ckpt.directory}")
        return state

    def batches(self, start: int, num_steps: Optional[int] = None, prefetch: int = 2):
        """Global batches of steps start, start + 1, ..., sharded over the mesh (a closeable iterator)."""
        from jdiff.data import iterate_batches

        c = self.config
        return iterate_batches(
            self.source,
            start_step=start,
            global_batch_size=c.optim.batch_size,
            seed=c.run.seed,
            num_steps=num_steps,
            random_flip=c.data.random_flip,
            sharding=batch_sharding(self.mesh),
            prefetch=prefetch,
        )


def setup(config: TrainConfig, devices: Optional[Sequence[Any]] = None) -> Setup:
    """Builds the parts of the run `config` describes on `devices` (default: all). Nothing is computed yet:
    the init and step functions compile on first use. Raises ConfigError / ValueError for bad settings."""
    mesh = make_mesh(devices)
    check_batch_size(config.optim.batch_size, mesh)
    rep = replicated(mesh)
    source = build_source(config)
    num_classes = model_num_classes(config, getattr(source, "num_classes", None))
    image_shape = tuple(int(d) for d in source.image_shape)
    model = build_model(config, num_classes)
    tx = make_optimizer(config.optim)
    init = functools.partial(init_train_state, model, tx, image_shape, config.run.seed)
    init_fn = jax.jit(init, out_shardings=rep)
    try:  # traces the model once: its own constraints on its fields and the image shape are checked here
        shapes = jax.eval_shape(init)
    except (ValueError, TypeError, ZeroDivisionError, IndexError) as e:
        raise ConfigError(
            f"model {config.model.name!r} with fields {dict(config.model.fields)} cannot be built for "
            f"{image_shape} images: {one_line(e, 300)}"
        ) from None
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), shapes)
    return Setup(
        config,
        mesh,
        source,
        model,
        jax.device_put(build_schedule(config), rep),
        tx,
        num_classes,
        image_shape,
        init_fn,
        abstract,
        make_step_fn(model, config, mesh),
    )
