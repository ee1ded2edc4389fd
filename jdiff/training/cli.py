"""Command line of train.py: `--preset NAME`, `--FIELD VALUE` for every TrainConfig field,
`--model.FIELD VALUE` for model overrides, `--set KEY=VALUE` (applied last, in order).

Errors in flags or values print one line on stderr and exit with status 2; training errors (non-finite
loss, unreadable checkpoint) print one line and exit with status 1; a SIGTERM/SIGINT stop exits 0 (a second
Ctrl-C: status 130).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from jdiff.training.config import PRESETS, ConfigError, field_help, to_dict

PROG = "train.py"

EPILOG = f"""presets: {', '.join(PRESETS)} (default digits: 8x8 digits, a few minutes on a CPU).
A workdir that already holds config.json resumes from its latest checkpoint with the saved settings;
flags given on the command line override them (e.g. --steps to train longer), but a change of model or
data (dataset, image_size, channels, class_conditional, model, --model.*, schedule, num_timesteps,
zero_terminal_snr, objective) is refused. Values: ints, floats (1e-4), booleans (true/false), none.
Examples:
  python train.py
  python train.py --preset mnist --steps 1000 --lr 1e-4 --model.ch 64
  python train.py --set batch_size=64 --set model.dropout=0.1 --workdir runs/try1
Multi-host: --coordinator_address HOST:PORT --num_processes N --process_id I (or the environment
variables JDIFF_COORDINATOR_ADDRESS, JDIFF_NUM_PROCESSES, JDIFF_PROCESS_ID); every host runs the same
command and reads its own slice of each global batch."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        _fail(message, 2)


def _fail(message: str, code: int):
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Train a jdiff diffusion model.", epilog=EPILOG, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=list(PRESETS), help="named base config (default: digits)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any field or model.FIELD; applied after the --FIELD flags, in order")
    run.add_argument("--resume", action="store_true",
                     help="require an existing checkpoint in --workdir (error if there is none)")
    run.add_argument("--print_config", action="store_true", help="print the resolved config as JSON and exit")
    run.add_argument("--no_progress", action="store_true", help="no progress bar (log lines instead)")
    dist = p.add_argument_group("multi-host (jax.distributed.initialize)")
    dist.add_argument("--coordinator_address", metavar="HOST:PORT")
    dist.add_argument("--num_processes", type=int, metavar="N")
    dist.add_argument("--process_id", type=int, metavar="I")
    cfg = p.add_argument_group("config fields (--FIELD VALUE; model fields: --model.FIELD VALUE, e.g. --model.ch 64)")
    for name, tname, help_text in field_help():
        if name == "model_overrides":
            cfg.add_argument(f"--{name}", dest=f"field:{name}", metavar="JSON",
                             help="all model overrides as a JSON object (replaces them)")
            continue
        kw = dict(nargs="?", const="true") if tname == "bool" else {}
        cfg.add_argument(f"--{name}", dest=f"field:{name}", metavar=tname.upper(), help=help_text, **kw)
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Optional[str], dict]:
    """(namespace, preset, ordered overrides {key: string value}); exits 2 with one line on a bad flag."""
    parser = build_parser()
    ns, rest = parser.parse_known_args(list(argv))
    overrides: dict[str, str] = {}
    for key, value in vars(ns).items():
        if key.startswith("field:") and value is not None:
            overrides[key[len("field:"):]] = value
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--model."):
            if "=" in tok:
                k, v = tok[2:].split("=", 1)
                i += 1
            elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                k, v = tok[2:], rest[i + 1]
                i += 2
            else:
                parser.error(f"{tok} needs a value")
            overrides[k] = v
        else:
            hint = ""
            if tok.startswith("--"):
                import difflib

                opts = [o for a in parser._actions for o in a.option_strings]
                close = difflib.get_close_matches(tok.split("=")[0], opts, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
            parser.error(f"unrecognized argument {tok!r}{hint}; see --help")
    for item in ns.set:
        if "=" not in item:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v
    return ns, ns.preset, overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of train.py; returns the exit status."""
    ns, preset, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from jdiff.training.checkpoint import CheckpointError, silence_closed_loop_noise
    from jdiff.training.run_config import resolve_config

    silence_closed_loop_noise()

    from jdiff.training.factory import check_model_fields

    try:
        config, resumed = resolve_config(preset, overrides)
        check_model_fields(config)
    except ConfigError as e:
        _fail(e, 2)
    if ns.print_config:
        print(json.dumps(to_dict(config), indent=2, sort_keys=True))
        return 0
    from jdiff.training.mesh import maybe_initialize_distributed

    try:
        maybe_initialize_distributed(ns.coordinator_address, ns.num_processes, ns.process_id)
    except (ValueError, RuntimeError) as e:
        _fail(f"distributed initialisation failed: {e}", 2)
    from jdiff.training.loop import NonFiniteLossError, train

    if ns.resume:
        from jdiff.training.checkpoint import Checkpointer

        try:
            with Checkpointer(config.workdir, create=False) as ck:
                if ck.latest_step() is None:
                    raise CheckpointError(f"--resume: no checkpoint in {ck.directory}")
        except CheckpointError as e:
            _fail(e, 1)
    try:
        train(config, progress=not ns.no_progress)
    except (NonFiniteLossError, CheckpointError) as e:
        _fail(e, 1)
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint was being written
        _fail("interrupted twice: stopped without saving the current step (earlier checkpoints are kept)", 130)
    except ValueError as e:  # ConfigError and other bad settings found once the run starts
        _fail(e, 2)
    return 0
