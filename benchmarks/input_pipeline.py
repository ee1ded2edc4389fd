"""Input pipeline throughput: 256x256 JPEG decoding vs workers, and the input-wait share of a training step.

Part 1, decoding. The script writes a folder of JPEGs (default 512, sides drawn from 256..400, smooth random
colour fields plus noise, quality 90, so that they compress like photographs) into a temporary directory and
decodes all of them to float32 256x256x3 (shorter side resized, centre crop: `jdiff.data.image_ops.prepare`) in
batches of --batch, with each decoder at 1, 2 and os.cpu_count() workers:

  threads    `ImageFolderSource(folder, 256, workers=k).get(indices)`: what training runs (`data.workers`).
  processes  a `concurrent.futures.ProcessPoolExecutor(k)` (spawned once, warmed up) decoding contiguous chunks
             of each batch with the same `prepare(read_image(f))`, the arrays pickled back to the parent.
  grain      grain's `MapDataset.source(files).map(decode).batch(B).to_iter_dataset(ReadOptions(num_threads=T))
             .mp_prefetch(k workers)`, T = --grain-threads (default 1, so that k workers decode k images at a
             time like the others; grain's own default is 16 threads per worker process), when `import grain`
             works (it is not a jdiff dependency: `pip install grain`). A fresh iterator per pass, so that its
             workers do not decode ahead while the others are timed; the worker start-up and one extra first
             batch are not timed, and the files are decoded 3 times per pass, so that what the workers read
             ahead during the first batch counts little.

For the threads, "CPU s / wall s" is the CPU time of all the process's threads per wall second of decoding:
above 1 the threads ran in parallel (the GIL was released), a figure that load from other jobs lowers less
than the speed-up. The variants are measured in interleaved rounds (so load from other jobs affects all
alike); the figure is images/s of the median round, and "speed-up" is against the same decoder at 1 worker.
The 1-minute load average is printed next to every figure: on a shared machine, a scaling figure means little
when the load exceeds the cores.

Part 2, input wait. `jdiff.training.setup(config)` of a preset with a small batch runs --steps training steps
fed by `Setup.batches` (the prefetching iterator train.py uses); the input wait is the time spent in `next()`
on it, as a share of the wall time of the steps. Presets: "digits" (the default preset) and "cifar10" (its
U-Net and settings at --cifar-batch; the data is a folder of 32x32 PNGs the script writes, standing in for
tfds cifar10, which stores PNGs too, unless --cifar-data names a prepared dataset).

    python benchmarks/input_pipeline.py                       # everything, about 2-3 minutes on 2 cores
    python benchmarks/input_pipeline.py --no-wait --rounds 5  # decoding only
    python benchmarks/input_pipeline.py --images 128 --steps 4 --json input.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

import numpy as np
from PIL import Image

SIZE = 256
GRAIN_PASSES = 3  # grain decodes the files this many times per timed pass, so that its read-ahead counts little


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def emit(row: dict, out) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        out.write(line + "\n")
        out.flush()


def write_jpegs(root: str, n: int, seed: int = 0, sides: tuple[int, int] = (SIZE, 400)) -> list[str]:
    """n photograph-like JPEGs (sides uniform in `sides`) in root; their paths, sorted."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        low = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        pixels = np.asarray(low, np.float32) + rng.normal(0, 12, (h, w, 3))
        path = os.path.join(root, f"{i:05d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def write_pngs(root: str, n: int, side: int = 32, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(os.path.join(root, f"{i:05d}.png"))


def _cpu_s() -> float:
    """CPU seconds of this process, all its threads (not its child processes)."""
    t = os.times()
    return t.user + t.system


def decode_chunk(files: list[str]) -> np.ndarray:
    """What a worker process does: the same decode as ImageFolderSource.get, for a chunk of files."""
    from jdiff.data import image_ops

    return np.stack([image_ops.prepare(image_ops.read_image(f), SIZE, 3) for f in files])


def grain_decode(path: str) -> np.ndarray:
    from jdiff.data import image_ops

    return image_ops.prepare(image_ops.read_image(path), SIZE, 3)


class Decoder:
    """One variant at one worker count: `run()` decodes every image once, in batches."""

    def __init__(self, kind: str, workers: int, folder: str, files: list[str], batch: int, grain_threads: int = 1):
        self.kind, self.workers, self.batch, self.files = kind, workers, batch, files
        self.grain_threads = grain_threads
        self.pool, self.cpu_per_wall = None, []
        if kind == "threads":
            from jdiff.data import ImageFolderSource

            self.source = ImageFolderSource(folder, SIZE, 3, workers=workers)
        elif kind == "processes":
            import multiprocessing

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            list(self.pool.map(decode_chunk, [files[:1]] * workers))  # start and warm the workers
        elif kind == "grain":
            import grain
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain reads its absl flags in the workers
                flags.FLAGS.mark_as_parsed()
            if len(files) % batch:
                raise ValueError(f"--images must be a multiple of --batch for grain, got {len(files)}, {batch}")
            self.grain = grain
        else:
            raise ValueError(kind)

    def run(self) -> tuple[int, float]:
        """(images decoded in the timed part, its seconds)."""
        if self.kind == "grain":  # a fresh iterator per pass, so no worker decodes ahead while others are timed
            g, n = self.grain, 0
            files = self.files * GRAIN_PASSES + self.files[: self.batch]
            ds = g.MapDataset.source(files).map(grain_decode).batch(self.batch)
            read = g.ReadOptions(num_threads=self.grain_threads)  # grain's default: 16 threads per worker process
            mp = g.MultiprocessingOptions(num_workers=self.workers)
            iterator = iter(ds.to_iter_dataset(read_options=read).mp_prefetch(mp))
            next(iterator)  # worker start-up and the first (extra) batch are not timed
            t = time.perf_counter()
            for b in iterator:
                n += len(b)
            t = time.perf_counter() - t
            del iterator
            return n // GRAIN_PASSES, t / GRAIN_PASSES
        t, n, cpu = time.perf_counter(), 0, _cpu_s()
        for lo in range(0, len(self.files), self.batch):
            if self.kind == "threads":
                n += len(self.source.get(np.arange(lo, min(lo + self.batch, len(self.files))))["image"])
            else:
                part = self.files[lo : lo + self.batch]
                bounds = np.linspace(0, len(part), self.workers + 1).round().astype(int)
                chunks = [part[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
                n += len(np.concatenate(list(self.pool.map(decode_chunk, chunks))))
        t = time.perf_counter() - t
        self.cpu_per_wall.append((_cpu_s() - cpu) / t)
        return n, t

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def bench_decode(args, out) -> list[dict]:
    kinds = ["threads", "processes"]
    try:
        import grain  # noqa: F401

        kinds.append("grain")
    except ImportError:
        print("grain not installed: its variant is skipped (pip install grain)", file=sys.stderr)
    kinds = [k for k in kinds if k in args.kinds]
    counts = sorted({int(w) for w in args.workers.split(",")} if args.workers else {1, 2, os.cpu_count() or 1})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = write_jpegs(tmp, args.images)
        print(f"wrote {len(files)} JPEGs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        decoders = {(k, w): Decoder(k, w, tmp, files, args.batch, args.grain_threads) for k in kinds for w in counts}
        times: dict = {key: [] for key in decoders}
        loads: dict = {key: [] for key in decoders}
        try:
            for r in range(args.rounds):
                order = list(decoders) if r % 2 == 0 else list(decoders)[::-1]
                for key in order:
                    n, seconds = decoders[key].run()
                    times[key].append(seconds)
                    loads[key].append(load1())
                    assert n == len(files), (key, n)
        finally:
            for d in decoders.values():
                d.close()
    for k, w in decoders:
        med = statistics.median(times[(k, w)])
        base = statistics.median(times[(k, 1)])
        rows.append(
            dict(
                part="decode",
                decoder=k,
                workers=w,
                image_size=SIZE,
                images=len(files),
                batch=args.batch,
                images_per_s=round(len(files) / med, 1),
                speedup_vs_1=round(base / med, 2),
                load1=round(statistics.median(loads[(k, w)]), 2),
                # threads: CPU seconds of all decoding threads per wall second (> 1: they ran in parallel)
                cpu_per_wall=round(statistics.median(decoders[(k, w)].cpu_per_wall), 2) if k == "threads" else None,
                cores=os.cpu_count(),
            )
        )
        emit(rows[-1], out)
    return rows


def input_wait(preset: str, overrides: dict, steps: int) -> dict:
    """Trains `steps` steps of the preset (after 2 warm-up steps, compile included there); returns the share
    of the wall time spent waiting for the next batch."""
    import jax

    from jdiff.config import apply_overrides, get_preset
    from jdiff.run import replicated
    from jdiff.training import setup
    from jdiff.training.step import init_accumulator

    s = setup(apply_overrides(get_preset(preset), overrides))
    state, acc = s.init_fn(), jax.device_put(init_accumulator(), replicated(s.mesh))
    warm = 2
    wait = 0.0
    with s.batches(0, warm + steps) as batches:
        for i in range(warm + steps):
            if i == warm:
                jax.block_until_ready(state)
                start, wait = time.perf_counter(), 0.0
            t = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t
            state, acc = s.step_fn(state, batch, s.schedule, acc)
        jax.block_until_ready(state)
    total = time.perf_counter() - start
    return dict(step_s=round(total / steps, 4), wait_share=round(wait / total, 4))


def bench_wait(args, out) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[tuple[str, dict]] = [("digits", {"optim.batch_size": args.digits_batch})]
        data = args.cifar_data
        if data is None:
            write_pngs(tmp, 4 * args.cifar_batch * (args.steps + 2))
            data = tmp
        cifar = {"optim.batch_size": args.cifar_batch, "data.dataset": data}
        if data == tmp:
            cifar["data.image_size"] = 32
        cases.append(("cifar10", cifar))
        for preset, over in [c for c in cases if c[0] in args.presets.split(",")]:
            over = {**over, "run.workdir": os.path.join(tmp, "run_" + preset)}
            r = input_wait(preset, over, args.steps)
            rows.append(dict(part="input_wait", preset=preset, batch=over["optim.batch_size"], steps=args.steps, **r))
            rows[-1]["load1"] = load1()
            emit(rows[-1], out)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512, help="JPEGs to write and decode")
    p.add_argument("--batch", type=int, default=64, help="images per decoded batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default=None, help="worker counts, e.g. 1,2,8 (default: 1, 2 and the cores)")
    p.add_argument("--grain-threads", type=int, default=1, help="threads per grain worker process (grain: 16)")
    p.add_argument("--kinds", default="threads,processes,grain", help="decoders to measure (comma-separated)")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per preset (input-wait part)")
    p.add_argument("--presets", default="digits,cifar10", help="presets of the input-wait part")
    p.add_argument("--digits-batch", type=int, default=128)
    p.add_argument("--cifar-batch", type=int, default=8)
    p.add_argument("--cifar-data", default=None, help="a prepared cifar10 (tfds name) instead of written PNGs")
    p.add_argument("--json", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    args.kinds = args.kinds.split(",")
    out = open(args.json, "a") if args.json else None
    print(f"cores={os.cpu_count()} load1={load1()}", file=sys.stderr)
    rows: list[dict] = []
    if not args.no_decode:
        rows += bench_decode(args, out)
    if not args.no_wait:
        rows += bench_wait(args, out)
    table = _table(rows)
    print(table)
    if out:
        out.close()
    return 0


def _table(rows: list[dict]) -> str:
    lines = []
    dec = [r for r in rows if r["part"] == "decode"]
    if dec:
        lines += [
            "| decoder | workers | 256x256 images/s | speed-up vs 1 worker | CPU s / wall s | load (1 min) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['decoder']} | {r['workers']} | {r['images_per_s']} | {r['speedup_vs_1']} | "
            f"{'-' if r['cpu_per_wall'] is None else r['cpu_per_wall']} | {r['load1']} |"
            for r in dec
        ]
    wait = [r for r in rows if r["part"] == "input_wait"]
    if wait:
        lines += ["", "| preset | batch | step s | input wait share | load (1 min) |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['preset']} | {r['batch']} | {r['step_s']} | {100 * r['wait_share']:.1f}% | {r['load1']} |"
            for r in wait
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
