"""train.py: `python train.py [--preset NAME] [--KEY VALUE ...]`.

Every config field is a flag `--SECTION.FIELD VALUE` (or `--SECTION.FIELD=VALUE`), e.g. `--optim.lr 1e-4`;
`--model.FIELD` sets a field of the model and `--sampling.OPTION` an option of the preview sampler. Flags
apply in order, after the preset (or, when resuming, after the saved config).

Errors in flags or values print one line on stderr and exit with status 2; training errors (non-finite
loss, unreadable checkpoint) print one line and exit with status 1; a SIGTERM/SIGINT stop exits 0 (a second
Ctrl-C: status 130).
"""

import json
import os
import sys
from typing import Any, Mapping, Optional, Sequence

from jdiff.cli.common import Parser, both, fail, unknown_flag
from jdiff.config import (
    KEYS,
    PRESETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    fixed_conflicts,
    get_preset,
    resolve,
    suggest,
    to_dict,
)

PROG = "train.py"


def _key_help() -> str:
    from jdiff.models import model_config
    from jdiff.sampling import all_options

    lines, section = [], None
    for k in KEYS.values():
        s = k.path.split(".")[0]
        if s != section:
            lines.append(f"[{s}]")
            section = s
        lines.append(f"  --{k.path}: {k.spec.summary()}")
        if k.path == "model.fields":
            own = ("dtype", "remat", "remat_policy")  # keys of their own: --model.dtype, --model.remat, ...
            fields = ", ".join(f for f in model_config("unet_small") if f not in own)
            lines.append(f"  --model.FIELD: a field of the chosen model (unet_small: {fields})")
        if k.path == "sampling.options":
            for name, (spec, samplers) in all_options().items():
                lines.append(f"  --sampling.{name}: {spec.summary()} (samplers: {', '.join(samplers)})")
    return "\n".join(lines)


EPILOG = """presets: {presets} (default digits: 8x8 digits, a few minutes on a CPU).
A workdir that already holds config.json resumes from its latest checkpoint with the saved settings; flags
override them (e.g. --optim.steps to train longer), but a change of a field that fixes the model or the data
({fixed}) is refused. Values: ints, floats (1e-4), booleans (true/false; a bare boolean flag means true),
tuples ("(1,2,2)"), none.
Examples:
  python train.py
  python train.py --preset mnist --optim.steps 1000 --optim.lr 1e-4 --model.ch 64
  python train.py --optim.batch_size 64 --model.dropout 0.1 --run.workdir runs/try1
Multi-host: --coordinator_address HOST:PORT --num_processes N --process_id I (or the environment variables
JDIFF_COORDINATOR_ADDRESS, JDIFF_NUM_PROCESSES, JDIFF_PROCESS_ID), or --coordinator_address auto on a Cloud
TPU pod or under SLURM srun; every host runs the same command and reads its own slice of each global batch.
A SIGTERM/SIGINT or an unreadable image on any process stops every process at the same step, with one
checkpoint, and all exit with the same status.

config keys:
{keys}"""

FLAGS = (
    "--preset",
    "--resume",
    "--print_config",
    "--no_progress",
    "--coordinator_address",
    "--num_processes",
    "--process_id",
    "--help",
)


def build_parser() -> Parser:
    import argparse

    class Help(argparse.Action):  # the key list imports the model and sampler registries: build it on demand
        def __call__(self, parser, *args):
            fixed = ", ".join(k for k, key in KEYS.items() if key.fixed)
            parser.epilog = EPILOG.format(presets=", ".join(PRESETS), fixed=fixed, keys=_key_help())
            parser.print_help()
            parser.exit()

    p = Parser(
        prog=PROG,
        description="Train a jdiff diffusion model.",
        allow_abbrev=False,
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-h", "--help", action=Help, nargs=0, help="show this help, with every config key, and exit")
    p.add_argument("--preset", choices=list(PRESETS), help="named base config (default: digits)")
    p.add_argument(
        *both("--resume"),
        action="store_true",
        help="require an existing checkpoint in the workdir (error if there is none)",
    )
    p.add_argument(*both("--print_config"), action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument(*both("--no_progress"), action="store_true", help="no progress bar (log lines instead)")
    p.add_argument(
        *both("--coordinator_address"), metavar="HOST:PORT", help="multi-host: the coordinator ('auto': TPU pod, SLURM)"
    )
    p.add_argument(*both("--num_processes"), type=int, metavar="N", help="multi-host: number of processes")
    p.add_argument(*both("--process_id"), type=int, metavar="I", help="multi-host: this process's index")
    return p


def parse_args(argv: Sequence[str]):
    """(namespace, overrides [(key, text)] in command-line order); exits 2 with one line on a bad flag."""
    parser = build_parser()
    ns, rest = parser.parse_known_args(list(argv))
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        key, eq, value = tok[2:].partition("=")
        try:
            path = resolve(key) if tok.startswith("--") and key else None
        except ConfigError:
            path = None
        if path is None:
            close = suggest(key) if tok.startswith("--") and key else None
            unknown_flag(PROG, tok, [*FLAGS, *(f"--{k}" for k in KEYS)], hint=close and f"--{close}")
        if not eq:
            is_bool = path in KEYS and KEYS[path].spec.kind is bool
            if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value, i = rest[i + 1], i + 1
            elif is_bool:
                value = "true"
            else:
                parser.error(f"{tok} needs a value")
        overrides.append((key, value))
        i += 1
    return ns, overrides


def resolve_config(
    preset: Optional[str], overrides: "Sequence[tuple[str, Any]] | Mapping[str, Any]"
) -> tuple[TrainConfig, bool]:
    """The config to run: the preset (default digits) + overrides, or, when the workdir already holds a
    config.json (with or without a checkpoint: a run stopped before its first save is still that run), the
    saved config + overrides (resume). Returns (config, resumed).

    Raises ConfigError when the overrides (or an explicitly named preset) change a field that fixes the model
    or the data of the saved run.
    """
    from jdiff.run.rundir import config_path, load_run_config

    overrides = list(overrides.items() if isinstance(overrides, Mapping) else overrides)
    fresh = apply_overrides(get_preset(preset or "digits"), overrides)
    path = config_path(fresh.run.workdir)
    if not os.path.isfile(path):
        return fresh, False  # a run's config is binding once written
    saved, _ = load_run_config(path)
    resumed = apply_overrides(saved, [("run.workdir", fresh.run.workdir), *overrides])
    conflicts = fixed_conflicts(saved, fresh if preset else resumed)
    if conflicts:
        raise ConfigError(
            f"{fresh.run.workdir} holds a run with a different model/data setup ({'; '.join(conflicts)}); "
            "resume with the same settings or choose a new --run.workdir"
        )
    return resumed, True


def _abort() -> None:
    """A second Ctrl-C: exit at once (status 130), without unwinding through compilation or orbax threads."""
    print(
        f"{PROG}: error: interrupted twice: stopped without saving the current step (earlier checkpoints are kept)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(130)


def main(argv: Optional[Sequence[str]] = None, early_signals: Sequence[int] = ()) -> int:
    """Entry point of train.py; returns the exit status. SIGTERM/SIGINT are caught from the first line (and
    `early_signals`, those train.py caught while importing, count too): one stops the run cleanly at the next
    point where it can (before the first step, or after the current step with a checkpoint), a second Ctrl-C
    exits at once with status 130."""
    import signal

    from jdiff.signals import SignalCatcher, StopFlag

    with SignalCatcher(StopFlag(), on_second=_abort) as flag:
        for signum in early_signals:
            if flag.requested and signum == signal.SIGINT:
                _abort()
            flag.request(signal.Signals(signum).name)
        return _main(sys.argv[1:] if argv is None else argv, flag)


def _main(argv: Sequence[str], flag) -> int:
    ns, overrides = parse_args(argv)
    try:
        config, _ = resolve_config(ns.preset, overrides)
    except ConfigError as e:
        fail(PROG, e, 2)
    if ns.print_config:
        print(json.dumps(to_dict(config), indent=2, sort_keys=True))
        return 0
    from jdiff.run import Checkpointer, CheckpointError, RunError, maybe_initialize_distributed

    try:
        maybe_initialize_distributed(ns.coordinator_address, ns.num_processes, ns.process_id)
    except (ValueError, RuntimeError) as e:
        fail(PROG, f"distributed initialisation failed: {e}", 2)
    from jdiff.data import DataError
    from jdiff.training import NonFiniteLossError, train

    if ns.resume:
        try:
            with Checkpointer(config.run.workdir, create=False) as ck:
                if ck.latest_step() is None:
                    raise CheckpointError(f"--resume: no checkpoint in {ck.directory}")
        except CheckpointError as e:
            fail(PROG, e, 1)
    try:
        train(config, progress=not ns.no_progress, stop=flag)
    except (NonFiniteLossError, RunError, DataError) as e:  # run-time failures (RunError: checkpoints too)
        fail(PROG, e, 1)
    except OSError as e:  # the workdir is a file, read-only, the disk is full...
        fail(PROG, f"cannot write the run in {config.run.workdir}: {e.strerror or e} ({e.filename or ''})", 1)
    except ValueError as e:  # ConfigError and other bad settings found once the run starts
        fail(PROG, e, 2)
    return 0
