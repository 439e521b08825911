"""Multi-rank test harness: run one function on N gloo ranks on CPU and collect what each returns.

Workers are spawned (not forked) with ``OMP_NUM_THREADS=1``, a fresh TCP port per world and a
timeout on the process group, so a hung collective fails the test instead of hanging CI. Run many
cases inside one ``fn`` to pay the spawn cost once per world.

    def _cases(rank, world_size, arg):
        ...            # torch.distributed is initialized (gloo) here
        return value   # must be picklable; gathered into the returned list by rank

    results = run_distributed(_cases, world_size=2, args=(arg,))

``fn`` must be importable at module level (spawn pickles it by name).
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, timeout_s, backend="gloo"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        kwargs = {}
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megacore import parallel as _parallel

            if hasattr(_parallel, "destroy"):
                _parallel.destroy()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, args: tuple = (), timeout_s: float = 240.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks (``backend="nccl"``: one GPU
    per rank); return results by rank.

    Raises ``RuntimeError`` with every failing rank's traceback if any rank fails or times out.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, timeout_s, backend), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    failures: list[str] = []
    import queue as _queue

    for _ in range(world_size):
        try:
            rank, ok, payload = queue.get(timeout=timeout_s + 30)
        except _queue.Empty:
            failures.append(f"timed out after {timeout_s + 30:.0f}s waiting for a rank")
            break
        if ok:
            results[rank] = payload
        else:
            failures.append(f"--- rank {rank} failed ---\n{payload}")
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    if failures:
        raise RuntimeError("distributed test failed:\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]
