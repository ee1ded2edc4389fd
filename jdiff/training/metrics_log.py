"""Metric records: JSON lines in workdir/metrics.jsonl (and TensorBoard when tensorboardX is installed)."""

import json
import os


class MetricsWriter:
    """Appends metric dicts as JSON lines to workdir/metrics.jsonl; a disabled writer (non-primary hosts)
    writes nothing."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._f = open(os.path.join(workdir, "metrics.jsonl"), "a") if enabled else None
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
