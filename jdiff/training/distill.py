"""Distilling a trained run into a few-step student, on the training loop of `jdiff.training.loop`.

A method is a small unit: a loss (student `Net`, teacher `Net` or None, labels, schedule, x0, key, step) ->
(loss, {"mse"}) built from the math of `jdiff.distill`, and the sampler the student is meant for. Everything
else is the training run's: the config keys (`optim.*`, `run.*`), the optimizer and EMA, checkpoints (the
teacher's parameters are part of the state, so resume is exact and a progressive round's teacher survives),
the lock, metrics.jsonl, signals and preview grids. Methods (`METHODS`):

- progressive (Salimans & Ho 2022, Alg. 2): rounds of optim.steps/rounds updates; round r trains a student of
  teacher_steps/2^(r+1) DDIM steps (spacing trailing) on the two-step DDIM target of its teacher; the student
  starts as the teacher and the teacher of round r+1 is round r's EMA student.
- consistency (CD, Song et al. 2023 Alg. 2 with iCT's recipe): the student starts as the teacher; the teacher
  takes one step of `solver` (any registered deterministic sampler) between adjacent levels.
- consistency_training (CT, iCT: Song & Dhariwal 2023): no teacher; the student starts from random weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdiff.config import ConfigError, TrainConfig
from jdiff.distill import consistency as cm
from jdiff.distill import progressive as pd
from jdiff.distill.net import Net
from jdiff.models import drop_labels
from jdiff.run.mesh import FSDP_RULES, fsdp_sharding
from jdiff.sampling import SAMPLERS
from jdiff.sampling.timesteps import flow_times, level_fn
from jdiff.spec import Spec
from jdiff.training.optim import ema_update
from jdiff.training.setup import Setup, setup, train_step_args
from jdiff.training.state import TrainState, init_train_state
from jdiff.training.step import make_step_fn

METHODS = ("progressive", "consistency", "consistency_training")


def _ode_samplers() -> tuple:
    return tuple(sorted(n for n, s in SAMPLERS.items() if not s.stochastic or n == "ddim"))


FIELDS: dict[str, Spec] = {
    "method": Spec(str, "progressive", "the distillation method", choices=METHODS),
    "teacher": Spec(str, None, "the teacher's run directory (none for consistency_training)", optional=True),
    "teacher_steps": Spec(int, 64, "progressive: the teacher's DDIM steps in round 1 (halved every round)", ge=2),
    "rounds": Spec(int, 1, "progressive: rounds (halvings of the steps); optim.steps is split evenly", ge=1),
    "solver": Spec(str, "heun", "consistency: the teacher's one-step ODE solver (a sampler)", choices=_ode_samplers),
    "sample_steps": Spec(int, 1, "consistency methods: the steps the student is sampled with", ge=1),
    "sigma_min": Spec(float, None, "consistency: s_min (none: the schedule's lowest EDM sigma)", optional=True, gt=0),
    "sigma_max": Spec(float, None, "consistency: s_max (none: the schedule's highest EDM sigma)", optional=True, gt=0),
    "sigma_data": Spec(float, 0.5, "consistency: sigma_data of the boundary parameterisation", gt=0.0),
    "s0": Spec(int, cm.S0, "consistency: iCT curriculum's initial intervals", ge=1),
    "s1": Spec(int, cm.S1, "consistency: iCT curriculum's final intervals", ge=1),
    "p_mean": Spec(float, cm.P_MEAN, "consistency: P_mean of iCT's lognormal level distribution"),
    "p_std": Spec(float, cm.P_STD, "consistency: P_std of iCT's lognormal level distribution", gt=0.0),
    "rho": Spec(float, 7.0, "consistency: rho of the Karras discretisation", gt=0.0),
}


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The distillation settings (`FIELDS`); build with `DistillConfig.parse`."""

    method: str = "progressive"
    teacher: Optional[str] = None
    teacher_steps: int = 64
    rounds: int = 1
    solver: str = "heun"
    sample_steps: int = 1
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    sigma_data: float = 0.5
    s0: int = cm.S0
    s1: int = cm.S1
    p_mean: float = cm.P_MEAN
    p_std: float = cm.P_STD
    rho: float = 7.0

    @classmethod
    def parse(cls, values: Mapping[str, Any], base: Optional["DistillConfig"] = None) -> "DistillConfig":
        """`base` (default: the defaults) with `values` ({field: value or command-line text}) applied and checked;
        ConfigError (one line) for an unknown field or a bad value."""
        out = dataclasses.asdict(base or cls())
        for name, value in values.items():
            if name not in FIELDS:
                raise ConfigError(
                    f"unknown distill key 'distill.{name}'; allowed: {', '.join(f'distill.{k}' for k in FIELDS)}"
                )
            try:
                out[name] = FIELDS[name].parse(f"distill.{name}", value)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        d = cls(**out)
        d.check()
        return d

    def check(self) -> None:
        if self.method == "consistency_training" and self.teacher is not None:
            raise ConfigError("method consistency_training trains without a teacher; drop --teacher")
        if self.method != "consistency_training" and self.teacher is None:
            raise ConfigError(f"method {self.method} needs --teacher RUN (a trained jdiff run directory)")
        if self.method == "progressive" and self.teacher_steps % 2**self.rounds:
            raise ConfigError(
                f"distill.teacher_steps ({self.teacher_steps}) must be divisible by 2^rounds ({2**self.rounds})"
            )
        if self.s1 < self.s0:
            raise ConfigError(f"distill.s1 ({self.s1}) must be >= distill.s0 ({self.s0})")


class DistillState(TrainState):
    """A `TrainState` with the teacher's parameters (None for consistency training), checkpointed with it."""

    teacher: Any = None


# ---------------------------------------------------------------------------------------------------
# Methods: (config, schedule, data dim) -> loss(student, teacher, labels, schedule, x0, key, step).


def edm_range(config: TrainConfig, d: DistillConfig, schedule: Any) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the consistency methods: the settings, else the schedule's EDM levels at t = 0
    and t = T - 1. ConfigError when the top level is infinite (a zero-terminal-SNR schedule)."""
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    lo = d.sigma_min if d.sigma_min is not None else float(np.sqrt((1 - abar[0]) / abar[0]))
    if d.sigma_max is not None:
        hi = d.sigma_max
    elif abar[-1] > 0:
        hi = float(np.sqrt((1 - abar[-1]) / abar[-1]))
    elif schedule.flow_shift is not None:  # a flow schedule: the first level of its flow_sigmas grid
        s = float(flow_times(schedule, "flow_sigmas", 1)[0])
        hi = s / (1.0 - s)
    else:
        raise ConfigError("the schedule's last level has zero SNR (infinite EDM sigma); set --distill.sigma_max")
    if not lo < hi:
        raise ConfigError(f"distill.sigma_min ({lo}) must be below distill.sigma_max ({hi})")
    return lo, hi


def progressive_loss(config: TrainConfig, d: DistillConfig, schedule: Any, dim: int) -> Callable:
    """Salimans & Ho Alg. 2, round r = step // (optim.steps / rounds): the student takes teacher_steps / 2^(r+1)
    steps."""
    per_round = max(config.optim.steps // d.rounds, 1)

    def loss(student, teacher, labels, sched, x0, key, step):
        r = jnp.minimum(step // per_round, d.rounds - 1)
        n = (d.teacher_steps // 2) // (2 ** r.astype(jnp.int32))
        return pd.progressive_loss(pd.x0_fn(student, labels), pd.x0_fn(teacher, labels), sched, x0, key, n)

    return loss


def consistency_loss(config: TrainConfig, d: DistillConfig, schedule: Any, dim: int) -> Callable:
    """The iCT loss (`jdiff.distill.consistency.consistency_loss`) with the curriculum over optim.steps; with a
    teacher (CD) x_i is its one `solver` step from x_{i+1}."""
    lo, hi = edm_range(config, d, schedule)
    solver = SAMPLERS[d.solver]
    options = {name: spec.default for name, spec in solver.options.items()}

    def loss(student, teacher, labels, sched, x0, key, step):
        level = level_fn(sched)
        n = cm.curriculum_levels(step, config.optim.steps, d.s0, d.s1)
        f = cm.consistency_fn(student, labels, level, lo, d.sigma_data)
        ts = None if teacher is None else cm.solver_step(solver, options, teacher, labels, level)
        return cm.consistency_loss(
            f,
            x0,
            key,
            n,
            sigma_min=lo,
            sigma_max=hi,
            max_levels=d.s1 + 1,
            huber=cm.huber_c(dim),
            rho=d.rho,
            p_mean=d.p_mean,
            p_std=d.p_std,
            teacher_step=ts,
        )

    return loss


LOSSES = {"progressive": progressive_loss, "consistency": consistency_loss, "consistency_training": consistency_loss}


def student_sampler(config: TrainConfig, d: DistillConfig, schedule: Any) -> dict[str, Any]:
    """The sampler, steps, spacing and options the student is meant for (recorded in its config.json)."""
    if d.method == "progressive":
        return {
            "sampler": "ddim",
            "steps": d.teacher_steps // 2**d.rounds,
            "spacing": "trailing",
            "options": {"eta": 0.0},
        }
    lo, _ = edm_range(config, d, schedule)
    options = {"sigma_min": lo, "sigma_data": d.sigma_data}
    spacing = "flow_sigmas" if schedule.flow_shift is not None else "trailing"  # flow: its first level is s_max
    return {"sampler": "consistency", "steps": d.sample_steps, "spacing": spacing, "options": options}


# ---------------------------------------------------------------------------------------------------
# The step and the setup.


def distill_step(
    state: DistillState,
    batch: Mapping[str, jax.Array],
    *,
    model: Any,
    schedule: Any,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    prediction: str,
    lr_schedule: Optional[Callable] = None,
    ema_decay: float,
    ema_warmup: bool = True,
    label_dropout: float = 0.0,
    round_steps: Optional[int] = None,
    param_sharding: Any = None,
) -> tuple[DistillState, dict[str, jax.Array]]:
    """One update of the student (`jdiff.training.step.train_step`'s randomness, optimizer and EMA): the loss
    of the method on the global batch with the student (train mode, dropout) and the teacher (eval mode, no
    gradient). round_steps (progressive): at step k R (k >= 1) the teacher becomes the EMA student first."""
    key = jax.random.fold_in(state.rng, state.step)
    diff_key, dropout_key, label_key = jax.random.split(key, 3)
    x0 = batch["image"].astype(jnp.float32)
    labels = None
    if model.num_classes is not None:
        labels = drop_labels(label_key, batch["label"].astype(jnp.int32), label_dropout, model.num_classes)
    teacher_params = state.teacher
    if round_steps is not None:
        new_round = (state.step > 0) & (state.step % round_steps == 0)
        teacher_params = jax.tree.map(lambda e, t: jnp.where(new_round, e, t), state.ema_params, teacher_params)
    scale = float(schedule.num_timesteps)

    def student_fn(p, x, t, y):
        return model.apply({"params": p}, x, t, y, train=True, rngs={"dropout": dropout_key})

    def teacher_fn(p, x, t, y):
        return model.apply({"params": p}, x, t, y, train=False)

    teacher = None
    if teacher_params is not None:
        teacher = Net(teacher_fn, jax.lax.stop_gradient(teacher_params), prediction, scale)

    def loss(params):
        return loss_fn(Net(student_fn, params, prediction, scale), teacher, labels, schedule, x0, diff_key, state.step)

    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    if param_sharding is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_sharding)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, ema_decay, ema_warmup)
    lr = jnp.nan if lr_schedule is None else lr_schedule(state.step)
    metrics = {
        "loss": value,
        "mse": aux["mse"],
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(lr, jnp.float32),
    }
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state, teacher=teacher_params)
    return new, metrics


@dataclasses.dataclass(frozen=True)
class DistillSetup(Setup):
    """A `Setup` whose state is a `DistillState` (student = teacher at step 0, or random for consistency training)
    and whose step is `distill_step` with the method's loss. `derived()` also records the distillation and
    the sampler the student is meant for, so sample.py draws from it without flags."""

    distill: DistillConfig = DistillConfig()
    teacher_params: Any = None  # the teacher's EMA parameters (None: consistency training)

    def __post_init__(self):
        c, d = self.config, self.distill
        if c.optim.grad_accum != 1:
            raise ConfigError("distillation runs with optim.grad_accum 1 (its losses call the model several times)")
        if c.model.is_text():
            raise ConfigError(f"distillation of text models ({c.model.name}) is not supported; distil a label model")
        image_shape = self.image_shape
        dim = int(np.prod(image_shape))
        loss_fn = LOSSES[d.method](c, d, self.schedule, dim)
        seed = c.run.seed
        if self.teacher_params is None:

            def init(teacher):
                s = init_train_state(self.model, self.tx, image_shape, seed)
                return DistillState(s.step, s.params, s.ema_params, s.opt_state, s.rng)
        else:

            def init(teacher):
                train_key = jax.random.split(jax.random.PRNGKey(seed))[1]
                copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
                return DistillState(
                    jnp.zeros((), jnp.int32),
                    copy(teacher),
                    copy(teacher),
                    self.tx.init(teacher),
                    train_key,
                    None,
                    teacher,
                )

        shapes = jax.eval_shape(init, self.teacher_params)
        rules = FSDP_RULES.get(type(self.model).__name__, ())
        state_sharding = fsdp_sharding(shapes, self.mesh, min_size=c.run.fsdp_min_size, rules=rules)
        abstract = jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, state_sharding
        )
        jitted = jax.jit(init, out_shardings=state_sharding)
        args = train_step_args(c)
        step = functools.partial(
            distill_step,
            model=self.model,
            loss_fn=loss_fn,
            tx=self.tx,
            prediction=c.diffusion.prediction,
            lr_schedule=self.lr_schedule,
            ema_decay=args["ema_decay"],
            ema_warmup=args["ema_warmup"],
            label_dropout=args["label_dropout"],
            round_steps=max(c.optim.steps // d.rounds, 1) if d.method == "progressive" and d.rounds > 1 else None,
        )
        object.__setattr__(self, "init_fn", lambda: jitted(self.teacher_params))
        object.__setattr__(self, "abstract_state", abstract)
        object.__setattr__(self, "step_fn", make_step_fn(step, self.mesh, state_sharding))

    def derived(self) -> dict[str, Any]:
        out = super().derived()
        out["sampler"] = student_sampler(self.config, self.distill, self.schedule)
        out["distill"] = dataclasses.asdict(self.distill)
        return out


def distill_setup(
    config: TrainConfig, devices=None, *, distill: DistillConfig, teacher_params: Any = None
) -> DistillSetup:
    """The `DistillSetup` of `config` (the student's run: the teacher's config with its own run/optim settings)
    and the teacher's parameters (a host or device pytree; None for consistency training)."""
    from jdiff.run import replicated

    base = setup(config, devices)
    parts = {f.name: getattr(base, f.name) for f in dataclasses.fields(Setup) if f.init}
    if teacher_params is not None:
        teacher_params = jax.device_put(teacher_params, replicated(base.mesh))
    return DistillSetup(**parts, distill=distill, teacher_params=teacher_params)
