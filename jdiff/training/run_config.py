"""The run's config.json: the resolved `TrainConfig` plus derived facts (label count, image shape), and
how a resumed run reconciles its command line with the saved config."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from jdiff.training.config import (ConfigError, TrainConfig, from_dict, get_preset, immutable_conflicts,
                                   replace_fields, to_dict, validate)

CONFIG_FILE = "config.json"


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def save_run_config(workdir: str, config: TrainConfig, derived: Mapping[str, Any]) -> str:
    """Writes workdir/config.json atomically: {"config": {...}, "derived": {...}}. Returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = config_path(workdir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"config": to_dict(config), "derived": dict(derived)}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_run_config(path: str) -> tuple[TrainConfig, dict[str, Any]]:
    """(config, derived) from a config.json written by `save_run_config`."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "config" not in data:
        raise ConfigError(f"{path} has no 'config' entry")
    return from_dict(data["config"]), dict(data.get("derived", {}))


def resolve_config(preset: Optional[str], overrides: Mapping[str, Any]) -> tuple[TrainConfig, bool]:
    """The config to run: preset (default "digits") + overrides, or, when the workdir already holds a
    config.json, the saved config + overrides (resume). Returns (config, resumed).

    Raises ConfigError when the overrides (or an explicitly named preset) change a field that fixes the
    model or data (see IMMUTABLE_ON_RESUME) of the saved run.
    """
    fresh = validate(replace_fields(get_preset(preset or "digits"), overrides))
    path = config_path(fresh.workdir)
    if not os.path.isfile(path):
        return fresh, False
    saved, _ = load_run_config(path)
    resumed = validate(replace_fields(replace_fields(saved, {"workdir": fresh.workdir}), overrides))
    conflicts = immutable_conflicts(saved, fresh if preset else resumed)
    if conflicts:
        raise ConfigError(
            f"{fresh.workdir} holds a run with a different model/data setup ({'; '.join(conflicts)}); "
            "resume with the same settings or choose a new --workdir")
    return resumed, True
