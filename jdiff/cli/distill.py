"""distill: `python -m jdiff.cli.distill --teacher RUN --method METHOD --workdir OUT [--KEY VALUE ...]`.

Distils the trained run RUN into a few-step student in OUT (`jdiff.training.distill`): methods progressive
(Salimans & Ho 2022), consistency (consistency distillation, Song et al. 2023, iCT recipe) and
consistency_training (no --teacher; iCT, Song & Dhariwal 2023). The student's run is a training run: it starts
from the teacher's config (same model, data and diffusion settings) and takes train.py's config keys
(`--optim.steps`, `--optim.batch_size`, `--optim.lr`, `--run.checkpoint_every`, ...) and the method's keys
`--distill.FIELD VALUE` (see --help). Checkpoints, resume (run the same command again), the workdir lock,
metrics.jsonl and SIGTERM/SIGINT behave as in train.py. The student's config.json records the sampler and step
count it is meant for, so `sample.py --workdir OUT` draws from it without flags.

Errors in flags or values (or a student setting that changes the teacher's model or data) print one line and
exit 2; a teacher run that cannot be read (no config.json, no checkpoint, different data) and training errors
exit 1; a SIGTERM/SIGINT stop exits 0.
"""

import dataclasses
import functools
import json
import os
import sys
from typing import Optional, Sequence

from jdiff.cli.common import Parser, both, fail, unknown_flag
from jdiff.config import KEYS, PRESETS, ConfigError, apply_overrides, fixed_conflicts, get_preset, resolve, to_dict

PROG = "distill"


def build_parser() -> Parser:
    import argparse

    from jdiff.training.distill import FIELDS, METHODS

    keys = "\n".join(f"  --distill.{name}: {spec.summary()}" for name, spec in FIELDS.items())
    p = Parser(
        prog=PROG,
        description="Distil a trained jdiff run into a few-step student.",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"distillation keys:\n{keys}\nand every train.py config key (python train.py --help).",
    )
    p.add_argument("--teacher", metavar="RUN", help="the teacher's run directory (not with consistency_training)")
    p.add_argument("--method", choices=METHODS, help="the distillation method (default: the saved one, or progressive)")
    p.add_argument("--workdir", metavar="OUT", help="the student's run directory (= --run.workdir)")
    p.add_argument("--preset", choices=list(PRESETS), help="consistency_training: the base config (default digits)")
    p.add_argument(*both("--print_config"), action="store_true", help="print the resolved configs as JSON and exit")
    p.add_argument(*both("--no_progress"), action="store_true", help="no progress bar (log lines instead)")
    return p


def parse_args(argv: Sequence[str]):
    """(namespace, config overrides [(key, text)], distill overrides {field: text}); exits 2 on a bad flag."""
    parser = build_parser()
    ns, rest = parser.parse_known_args(list(argv))
    overrides, distill = [], {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        key, eq, value = tok[2:].partition("=")
        if not tok.startswith("--") or not key:
            unknown_flag(PROG, tok, ["--teacher", "--method", "--workdir", *(f"--{k}" for k in KEYS)])
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                is_bool = key in KEYS and KEYS[key].spec.kind is bool
                if not is_bool:
                    parser.error(f"{tok} needs a value")
                value = "true"
            else:
                value, i = rest[i + 1], i + 1
        if key.startswith("distill."):
            distill[key[len("distill.") :]] = value
        else:
            try:
                resolve(key)
            except ConfigError as e:
                fail(PROG, e, 2)
            overrides.append((key, value))
        i += 1
    return ns, overrides, distill


def resolve_run(ns, overrides, distill_overrides):
    """(student config, DistillConfig, teacher RunInfo or None): a new student from the teacher's config (or the
    preset for consistency_training), or the saved student of --workdir (resume). Raises ConfigError (exit 2)
    or RunError (exit 1)."""
    from jdiff.run import build_schedule, open_run
    from jdiff.run.rundir import config_path, load_run_config
    from jdiff.training.distill import DistillConfig, student_sampler

    workdir = ns.workdir or dict(overrides).get("run.workdir")
    if not workdir:
        raise ConfigError("--workdir OUT is required (the student's run directory)")
    overrides = [*overrides, ("run.workdir", workdir)]
    given = {k: v for k, v in (("method", ns.method), ("teacher", ns.teacher)) if v is not None}
    if os.path.isfile(config_path(workdir)):  # resume: the saved student binds
        saved, derived = load_run_config(config_path(workdir))
        if "distill" not in derived:
            raise ConfigError(f"{workdir} holds a training run, not a distillation; choose another --workdir")
        d = DistillConfig.parse({}, DistillConfig(**derived["distill"]))
        for k, v in given.items():
            have = getattr(d, k)
            if (os.path.abspath(v) != os.path.abspath(have or "")) if k == "teacher" else v != have:
                raise ConfigError(
                    f"{workdir} holds a {d.method} distillation of {d.teacher}; resume it with its settings"
                )
        d = DistillConfig.parse(distill_overrides, d)
        config = apply_overrides(saved, overrides)
        conflicts = fixed_conflicts(saved, config)
        if conflicts:
            raise ConfigError(f"{workdir} holds a run with a different model/data setup ({'; '.join(conflicts)})")
        return config, d, (open_run(d.teacher) if d.teacher else None)
    if "teacher" in given:
        given["teacher"] = os.path.abspath(given["teacher"])
    d = DistillConfig.parse({**given, **distill_overrides})
    teacher = None
    if d.teacher is not None:
        if ns.preset:
            raise ConfigError(
                "--preset applies to consistency_training; a distillation starts from the teacher's config"
            )
        teacher = open_run(d.teacher)
        base = teacher.config
    else:
        base = get_preset(ns.preset or "digits")
    config = apply_overrides(base, overrides)
    if teacher is not None:
        conflicts = fixed_conflicts(teacher.config, config)
        if conflicts:
            raise ConfigError(
                f"the student keeps the teacher's model, data and diffusion settings ({'; '.join(conflicts)})"
            )
    rec = student_sampler(config, d, build_schedule(config))
    sampling = [("sampling.sampler", rec["sampler"]), ("sampling.steps", rec["steps"])]
    sampling += [("sampling.spacing", rec["spacing"]), ("sampling.options", rec["options"])]
    config = apply_overrides(config, [*sampling, *overrides])
    return config, d, teacher


def check_teacher_data(teacher, derived) -> None:
    """RunError unless the student's data is the teacher's (image shape, classes, dataset size)."""
    from jdiff.run import RunError

    for key in ("image_shape", "num_classes", "dataset_size"):
        was, now = teacher.derived.get(key), derived.get(key)
        if was is not None and was != now:
            raise RunError(
                f"the teacher {teacher.workdir} was trained on other data ({key} {was}, this data has {now}); "
                "restore the teacher's dataset"
            )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (see module docstring)."""
    from jdiff.cli.train import _abort
    from jdiff.signals import SignalCatcher, StopFlag

    with SignalCatcher(StopFlag(), on_second=_abort) as flag:
        return _main(sys.argv[1:] if argv is None else argv, flag)


def _main(argv: Sequence[str], flag) -> int:
    ns, overrides, distill_overrides = parse_args(argv)
    from jdiff.run import CheckpointError, RunError

    try:
        config, d, teacher = resolve_run(ns, overrides, distill_overrides)
    except ConfigError as e:
        fail(PROG, e, 2)
    except RunError as e:
        fail(PROG, f"teacher: {e}", 1)
    if ns.print_config:
        print(json.dumps({"config": to_dict(config), "distill": dataclasses.asdict(d)}, indent=2, sort_keys=True))
        return 0
    from jdiff._logs import quiet_absl
    from jdiff.data import DataError
    from jdiff.run import load_params
    from jdiff.training import NonFiniteLossError, train
    from jdiff.training.distill import distill_setup

    teacher_params = None
    if teacher is not None:
        try:
            with quiet_absl():
                _, _, teacher_params = load_params(teacher, which="ema")
        except (CheckpointError, OSError) as e:
            fail(PROG, f"teacher: {e}", 1)

    def build(cfg, devices):
        s = distill_setup(cfg, devices, distill=d, teacher_params=teacher_params)
        if teacher is not None:
            check_teacher_data(teacher, s.derived())
        return s

    try:
        train(config, progress=not ns.no_progress, stop=flag, build=functools.partial(build))
    except (NonFiniteLossError, RunError, DataError) as e:
        fail(PROG, e, 1)
    except OSError as e:
        fail(PROG, f"cannot write the run in {config.run.workdir}: {e.strerror or e} ({e.filename or ''})", 1)
    except ValueError as e:
        fail(PROG, e, 2)
    return 0


if __name__ == "__main__":
    from jdiff.cli.common import run_script

    run_script(main)
