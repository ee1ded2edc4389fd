"""What the per-step stop vote (`jdiff.training.stops.StopVote`) costs: two processes on localhost joined by
jax.distributed (one CPU device each) run the digits preset's train step (unet_tiny, batch 8 per process)
`--steps` times without the vote and `--steps` times with it before every step, as the training loop does,
in alternating rounds; reported: ms per step of both, their ratio, and the vote alone (ms per call).

On one process the vote is a local check (no exchange). On an accelerator the vote's cost is mostly that the
host waits for the previous step before dispatching the next (the same on CPU, where a step runs when it is
dispatched); run this there with the platform's devices for the figure that matters.

    python benchmarks/stop_vote.py                  # 2 processes, 30 steps x 3 rounds
    python benchmarks/stop_vote.py --steps 100 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def child(pid: int, port: int, steps: int, rounds: int) -> None:
    from jdiff.run import maybe_initialize_distributed

    maybe_initialize_distributed(f"localhost:{port}", 2, pid)
    import jax

    from jdiff.config import apply_overrides, get_preset
    from jdiff.run import replicated
    from jdiff.training import setup
    from jdiff.training.step import init_accumulator
    from jdiff.training.stops import StopVote

    s = setup(apply_overrides(get_preset("digits"), {"model.name": "unet_tiny", "optim.batch_size": 16}))
    state, acc = s.init_fn(), jax.device_put(init_accumulator(), replicated(s.mesh))
    with s.batches(0, 1) as it:
        batch = next(it)
    vote = StopVote()

    def run(n: int, voting: bool) -> float:
        nonlocal state, acc
        jax.block_until_ready((state, acc))
        t0 = time.perf_counter()
        for i in range(n):
            if voting and vote(i, None, False) is not None:
                raise RuntimeError("nobody asked to stop")
            state, acc = s.step_fn(state, batch, s.schedule, acc)
        jax.block_until_ready((state, acc))
        return (time.perf_counter() - t0) / n * 1e3

    run(2, True)  # compiles both
    plain, voted = [], []
    for r in range(rounds):
        for voting in (r % 2 == 0, r % 2 == 1):
            (voted if voting else plain).append(run(steps, voting))
    t0 = time.perf_counter()
    for i in range(steps):
        vote(i, None, False)
    alone = (time.perf_counter() - t0) / steps * 1e3
    if pid == 0:
        plain.sort(), voted.sort()
        p, v = plain[len(plain) // 2], voted[len(voted) // 2]
        print(json.dumps({"step_ms": p, "step_with_vote_ms": v, "ratio": v / p, "vote_alone_ms": alone}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.steps, args.rounds)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--steps", str(args.steps), "--rounds", str(args.rounds), "--child"]
    procs = [subprocess.Popen([*cmd, str(i), str(port)], env=env, stdout=subprocess.PIPE, text=True) for i in (0, 1)]
    out = [p.communicate(timeout=900)[0] for p in procs]
    r = json.loads(out[0].strip().splitlines()[-1])
    print(json.dumps(r))
    print("\n| train step ms | with the vote ms | ratio | vote alone ms |\n|---:|---:|---:|---:|")
    print(f"| {r['step_ms']:.2f} | {r['step_with_vote_ms']:.2f} | {r['ratio']:.3f} | {r['vote_alone_ms']:.3f} |")


if __name__ == "__main__":
    main()
