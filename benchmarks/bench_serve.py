"""Load benchmark of ``dcm.serve`` on loopback: N concurrent clients x M interactions, latency per type.

    python benchmarks/bench_serve.py                      # 8 sessions x 20 interactions, small preset
    python benchmarks/bench_serve.py --sessions 2 --interactions 5 --size 32 64 64

Each client is nnInteractive's real client (``nninteractive-client``) in its own thread, on its own image (a
bright cube at a random place): a box, then points (positive / negative, alternating), a scribble and an undo
every few steps. The server runs in this process (uvicorn in a thread, the models loaded once), so a number
is the round trip seen by a client, queueing on the device lock included. Prints p50 / p95 per interaction
type and the error count (the run fails when it is not zero).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections import defaultdict
from typing import Dict, List

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url: str, index: int, interactions: int, shape, timings: Dict[str, List[float]],
            errors: List[str], lock: threading.Lock) -> None:
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

    rng = np.random.default_rng(index)
    size = np.array([max(4, s // 3) for s in shape])
    lo = np.array([rng.integers(1, s - z - 1) for s, z in zip(shape, size)])
    hi = lo + size
    image = rng.normal(0, 5, (1, *shape)).astype(np.float32)
    image[(0, *[slice(a, b) for a, b in zip(lo, hi)])] += 100
    centre = (lo + hi) // 2

    def timed(kind: str, call) -> None:
        t = time.perf_counter()
        try:
            call()
        except Exception as e:  # noqa: BLE001 - counted, reported
            with lock:
                errors.append(f"client {index} {kind}: {type(e).__name__}: {e}")
            return
        with lock:
            timings[kind].append(time.perf_counter() - t)

    try:
        session = nnInteractiveRemoteInferenceSession(url, read_timeout=600)
    except Exception as e:  # noqa: BLE001
        with lock:
            errors.append(f"client {index} claim: {type(e).__name__}: {e}")
        return
    with session:
        timed("set_image", lambda: session.set_image(image, {"spacing": [1.0, 1.0, 1.0]}))
        buffer = np.zeros(shape, np.uint8)
        session.set_target_buffer(buffer)
        for step in range(interactions):
            if step == 0:
                timed("bbox", lambda: session.add_bbox_interaction([[int(a), int(b)] for a, b in zip(lo, hi)], True))
            elif step % 5 == 4:
                timed("undo", session.undo)
            elif step % 5 == 3:
                stroke = np.zeros((1, int(size[1]), 1), np.uint8)
                stroke[0, :, 0] = 1
                bbox = [[int(centre[0]), int(centre[0]) + 1], [int(lo[1]), int(hi[1])],
                        [int(centre[2]), int(centre[2]) + 1]]
                timed("scribble", lambda: session.add_scribble_interaction(stroke, True, interaction_bbox=bbox))
            else:
                positive = step % 2 == 1
                offset = rng.integers(-2, 3, 3) if positive else (size // 2 + 2) * rng.choice([-1, 1], 3)
                point = np.clip(centre + offset, 0, np.array(shape) - 1)
                timed("point+" if positive else "point-",
                      lambda: session.add_point_interaction([int(v) for v in point], positive))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="dcm_small")
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--interactions", type=int, default=20)
    p.add_argument("--size", type=int, nargs=3, default=[32, 64, 64], metavar=("Z", "Y", "X"))
    p.add_argument("--random-init", action="store_true",
                   help="random models (timing only): e.g. the full-size presets, whose weights are not shipped")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeat), e.g. --set engine.policy=global_only")
    p.add_argument("--threads", type=int, help="torch threads of the server")
    args = p.parse_args(argv)

    import uvicorn

    from dcm.serve import SessionRegistry, make_app, session_factory

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    factory = session_factory(args.config, args.weights, args.device, overrides=args.set, random_init=args.random_init)
    registry = SessionRegistry(factory, args.sessions, 600, 600)
    print(f"models loaded in {time.perf_counter() - t:.1f} s")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(registry), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    timings: Dict[str, List[float]] = defaultdict(list)
    errors: List[str] = []
    lock = threading.Lock()
    t = time.perf_counter()
    clients = [threading.Thread(target=_client, args=(f"http://127.0.0.1:{port}", i, args.interactions,
                                                      tuple(args.size), timings, errors, lock))
               for i in range(args.sessions)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t
    server.should_exit = True
    thread.join(30)

    print(f"{args.sessions} sessions x {args.interactions} interactions on {'x'.join(map(str, args.size))}, "
          f"{args.config} {' '.join(args.set)}{' (random init)' if args.random_init else ''}: "
          f"{wall:.1f} s wall, {len(errors)} errors")
    print(f"| {'interaction':<11} | {'n':>4} | {'p50 (s)':>8} | {'p95 (s)':>8} | {'max (s)':>8} |")
    print(f"|{'-' * 13}|{'-' * 6}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for kind in ("set_image", "bbox", "point+", "point-", "scribble", "undo"):
        values = np.array(timings.get(kind, []))
        if len(values):
            print(f"| {kind:<11} | {len(values):>4} | {np.percentile(values, 50):>8.3f} | "
                  f"{np.percentile(values, 95):>8.3f} | {values.max():>8.3f} |")
    for e in errors[:10]:
        print("error:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
