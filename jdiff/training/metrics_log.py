"""Metric records: JSON lines in workdir/metrics.jsonl (and TensorBoard when tensorboardX is installed)."""

import json
import os
from typing import Optional


def _drop_after(path: str, step: int) -> None:
    """Rewrites the JSON lines file `path` (atomically) without records whose "step" is > `step`, and without
    a torn last line."""
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, AttributeError):
            continue  # a line torn by a kill mid-write
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


class MetricsWriter:
    """Appends metric dicts as JSON lines to workdir/metrics.jsonl; a disabled writer (non-primary hosts)
    writes nothing. `after_step`: the step training resumes from; records of later steps (written before a
    kill, then replayed) are dropped first, so every step appears once."""

    def __init__(self, workdir: str, enabled: bool = True, after_step: Optional[int] = None):
        self.enabled = enabled
        path = os.path.join(workdir, "metrics.jsonl")
        if enabled and after_step is not None and os.path.exists(path):
            _drop_after(path, after_step)
        self._f = open(path, "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter  # optional

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
