"""Rescoring spread over a Ray cluster (`rescore --ray`, `import --rescore --ray`), and
generation on several vLLM engines (`measure --data-parallel N`, at the end of this module).

The run's rollout parts (the units `rescore_parts` scores one process at a time) are grouped
into shards balanced by token count (`plan_shards`); N Ray actors (`ShardScorer`) each load
the training-side model once and score their shards' parts with `pipeline.score_part`, the
one-process code path, writing each token part into the run directory (atomically: a part on
disk is finished). The driver (`score_on_ray`) hands shards out largest first, follows every
worker's progress, and finalizes the run as one process does, so the tokens are those of the
one-process rescore (bit-identical for float32 eager on a CPU: the same parts, the same
batches, the same per-position plan).

Fault tolerance: a part already on disk is never scored again; a shard whose actor died
(killed, out of memory) or raised goes back in the queue and is retried on another actor
(a replacement is started for a dead one) up to `RayOptions.max_attempts` attempts; past
that the run stops with one line naming the shard and the cause, and `--resume` continues
it from the finished parts.

The run directory must be on a filesystem every node sees (one machine, NFS, a shared
volume): actors read the rollout parts and write the token parts there.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import MismatchError, first_line
from .pipeline import (
    ROLLOUT,
    TOKENS,
    Progress,
    TrainSide,
    _response_tokens,
    generate_chunks,
    load_train_model,
    score_part,
    timed,
)
from .runs import RunDir

RAY_EXTRA = "ray"
MAX_ATTEMPTS = 3  # attempts per shard (the first and two retries)
SHARDS_PER_WORKER = 4  # more shards than workers: a slow or dead worker holds back less
POLL_S = 0.5  # how often the driver asks the workers how far they are
# Test hook: "SHARD:BATCHES" makes the worker scoring shard SHARD exit (os._exit) after
# BATCHES forward passes into it, on the shard's first attempt only, as a killed or
# out-of-memory actor would.
FAULT_ENV = "MISMATCH_RAY_FAULT"
# Test hook of --data-parallel: "SHARD" makes that shard's engine fail before its first part.
DP_FAULT_ENV = "MISMATCH_DP_FAULT"


@dataclass(frozen=True)
class RayOptions:
    """How `--ray` spreads the training side: the cluster (`address`: None starts a local
    Ray on every core of this machine; `auto` joins the one `ray start` made here;
    `HOST:PORT` or `ray://HOST:PORT` another), the number of actors (None: as many as the
    cluster's GPUs / `gpus_per_worker`, or its CPUs), GPUs per actor (None: 1 where the
    cluster has GPUs, else 0: a CPU actor with `threads_per_worker` torch threads), attempts
    per shard, and `resume` (continue the unfinished run of the same `--out`)."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    threads_per_worker: int = 1
    max_attempts: int = MAX_ATTEMPTS
    resume: bool = False

    def check(self) -> None:
        """One-line errors for impossible values, before anything starts."""
        if self.workers is not None and self.workers < 1:
            raise MismatchError(f"--workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise MismatchError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker:g}")
        if self.threads_per_worker < 1:
            raise MismatchError(f"threads per worker must be >= 1, got {self.threads_per_worker}")
        if self.max_attempts < 1:
            raise MismatchError(f"attempts per shard must be >= 1, got {self.max_attempts}")


def import_ray(flag: str = "--ray") -> Any:
    """The `ray` module, or one line saying which extra installs it (`flag`: the option
    that needs it)."""
    try:
        import ray
    except ImportError:
        raise MismatchError(
            f"{flag} needs Ray, which is not installed: pip install 'mismatch-cli[{RAY_EXTRA}]'"
        ) from None
    return ray


def _probe(address: str) -> None:
    """A TCP connection to `address` (HOST:PORT, optionally ray://), so an address where
    nothing listens is one line in seconds (ray.init itself retries for minutes)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise MismatchError(f"--ray-address {address}: not HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as e:
        raise MismatchError(
            f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e}); start "
            "one with `ray start --head` or give its address"
        ) from None


@dataclass
class Cluster:
    """The Ray this command uses: what it holds (`resources`) and whether we started it."""

    ray: Any
    address: str
    resources: dict[str, float]
    started: bool


@contextmanager
def connect(opts: RayOptions) -> Iterator[Cluster]:
    """Join (or start) the Ray cluster of `opts`; a Ray this process already started
    (`ray.init` in a test or a notebook) is used as it is. A Ray started here is shut down
    on exit."""
    ray = import_ray()
    started = False
    if ray.is_initialized():
        address = "this process's Ray"
    else:
        quiet = {"logging_level": "ERROR", "log_to_driver": False}
        if opts.address in (None, "", "local"):
            address = "local"
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
            started = True
        else:
            address = opts.address
            if address != "auto":
                _probe(address)
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise MismatchError(f"--ray-address {address}: {first_line(e)}") from None
            started = True  # our connection: closed on exit (the cluster goes on)
    try:
        # Ray prints its workers' deaths ("(raylet) A worker died ...") on stdout, which is
        # for results (--json): send them to stderr while the job runs
        with redirect_stdout(sys.stderr):
            yield Cluster(ray, address, dict(ray.cluster_resources()), started)
    finally:
        if started:
            ray.shutdown()


def plan_shards(tokens: Sequence[int], n_shards: int) -> list[list[int]]:
    """Parts (their token counts `tokens`) grouped into at most `n_shards` shards of nearly
    equal tokens: largest part first, each to the shard with the fewest tokens so far
    (longest-processing-time first). Parts stay in index order inside a shard; shards come
    largest first (the order they are handed out). Deterministic, so a resumed run plans
    the same shards."""
    n = max(1, min(n_shards, len(tokens)))
    shards: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        s = min(range(n), key=lambda s: (load[s], s))
        shards[s].append(i)
        load[s] += tokens[i]
    order = sorted(range(n), key=lambda s: (-load[s], s))
    return [sorted(shards[s]) for s in order if shards[s]]


def worker_shape(opts: RayOptions, resources: dict[str, float]) -> tuple[int, float]:
    """(workers, GPUs per worker) for `opts` on a cluster holding `resources`; one line if
    the cluster cannot hold them (Ray would wait for them forever)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    g = opts.gpus_per_worker if opts.gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if g > 0:
        n = opts.workers if opts.workers is not None else int(gpus // g)
        if n * g > gpus or n < 1:
            raise MismatchError(
                f"the Ray cluster has {gpus:g} GPU(s): {n or 1} worker(s) x {g:g} GPU(s) do not fit"
            )
    else:
        n = opts.workers if opts.workers is not None else max(1, int(cpus))
        if n > cpus:
            raise MismatchError(
                f"the Ray cluster has {cpus:g} CPU(s): --workers {n} needs {n} (one per worker)"
            )
    return n, g


def parse_fault(spec: str | None) -> tuple[int, int] | None:
    """`FAULT_ENV`'s "SHARD:BATCHES" as (shard, batches); None when unset."""
    if not spec:
        return None
    try:
        w, b = spec.split(":")
        return int(w), int(b)
    except ValueError:
        raise MismatchError(f"{FAULT_ENV}={spec!r}: expected SHARD:BATCHES") from None


class ShardScorer:
    """One worker (a Ray actor, made by `ray.remote(...)(ShardScorer)`): the training-side
    model loaded once, shards scored part by part through `pipeline.score_part`. Threaded
    (two calls at once), so `progress` answers while `score_shard` runs."""

    def __init__(
        self,
        run_path: str,
        train: TrainSide,
        sampling: Any,
        total_rows: int,
        gpus: float,
        threads: int,
        index: int,
        fault: tuple[int, int] | None = None,
    ) -> None:
        import torch

        from .rescore import plan_pass

        t0 = time.perf_counter()
        if gpus <= 0:
            torch.set_num_threads(threads)
        device = torch.device("cuda" if gpus > 0 else "cpu")
        device_map = "auto" if gpus > 1 else train.device_map  # its GPUs, as Ray sets them
        self.train = replace(train, device=device, device_map=device_map)
        self.model = load_train_model(self.train)
        self.sampling = sampling
        self.plan = plan_pass(self.model, sampling, train.memory, total_rows)
        self.run = RunDir(Path(run_path))
        self.index, self.fault = index, fault
        self.load_s = time.perf_counter() - t0
        self._lock = threading.Lock()
        self._done = 0  # tokens (logit rows) scored by this worker, every attempt
        self._busy = 0.0  # seconds spent scoring
        self._since: float | None = None  # start of the part being scored
        self._current = 0  # tokens into that part
        self._parts: list[int] = []  # parts finished by this worker

    def info(self) -> dict[str, Any]:
        """Where this worker runs and how: node, pid, device, torch threads, the
        per-position plan, the model's load time."""
        import ray
        import torch

        return {
            "worker": self.index,
            "node": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "device": str(self.train.device),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "torch_threads": torch.get_num_threads(),
            "per_position": self.plan.record(),
            "load_s": round(self.load_s, 3),
        }

    def score_shard(self, shard: int, parts: Sequence[int], attempt: int) -> list[int]:
        """Score every part of shard `shard` (`parts`) that has no token part yet; returns
        those scored."""
        scored = []
        die = self.fault[1] if self.fault and self.fault[0] == shard and attempt == 0 else None
        passes = [0]

        def advance(n: int) -> None:
            with self._lock:
                self._done += n
                self._current += n
            passes[0] += 1
            if die is not None and passes[0] >= die:
                os._exit(1)  # the test hook: die as a killed actor does, mid-shard

        for i in parts:
            if self.run.has_part(TOKENS, i):
                continue
            with self._lock:
                self._since, self._current = time.perf_counter(), 0
            score_part(self.run, i, self.model, self.train, self.sampling, self.plan, advance)
            with self._lock:
                self._busy += time.perf_counter() - (self._since or time.perf_counter())
                self._since, self._current = None, 0
                self._parts.append(i)
            scored.append(i)
        return scored

    def progress(self) -> dict[str, Any]:
        """Finished parts, tokens into the current one, tokens and seconds so far."""
        with self._lock:
            busy = self._busy + (time.perf_counter() - self._since if self._since else 0.0)
            return {"parts": list(self._parts), "current": self._current,
                    "tokens": self._done, "busy_s": busy}  # fmt: skip


@dataclass
class _Worker:
    """The driver's view of one actor: its number, handle and `info`, the shard it holds
    (None: idle) and that call's ref, the pending progress call and its last answer."""

    index: int
    actor: Any
    info: dict[str, Any]
    shard: int | None = None
    ref: Any = None
    poll: Any = None
    last: dict[str, Any] | None = None


def _cause(e: BaseException) -> str:
    """One line for why a shard's attempt failed: the actor's death (with Ray's exit
    detail) or the exception it raised."""
    text = str(e)
    first = first_line(e)
    if "Worker exit detail:" in text:
        detail = text.split("Worker exit detail:", 1)[1].strip().split(". ")[0].rstrip(".")
        return f"{first.rstrip('.')} ({detail})"
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        return f"{type(cause).__name__}: {first_line(cause)}"
    return first


def score_on_ray(
    run: RunDir,
    n_parts: int,
    train: TrainSide,
    sampling: Any,
    cluster: Cluster,
    opts: RayOptions,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    save: Callable[..., None] = lambda **_: None,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Score the rollout parts 0..n_parts-1 of `run` that lack a token part on the actors
    of `cluster`, as `pipeline.rescore_parts` does in one process. Returns (the first
    worker's per-position plan, for run.json's engines.train, None if nothing was left;
    the `ray` record: address, workers, their devices, the shard plan). `save(ray=...)` is
    called whenever the record changes. A shard that failed `opts.max_attempts` times is
    one MismatchError naming it and the cause (the finished parts stay)."""
    ray = cluster.ray
    prog = progress or Progress()
    timings = {} if timings is None else timings
    n_workers, gpus = worker_shape(opts, cluster.resources)
    tokens = [_response_tokens(run.part_path(ROLLOUT, i)) for i in range(n_parts)]
    shards = plan_shards(tokens, n_workers * SHARDS_PER_WORKER)
    todo = [s for s, parts in enumerate(shards) if not all(run.has_part(TOKENS, i) for i in parts)]
    left = [i for i in range(n_parts) if not run.has_part(TOKENS, i)]
    total = sum(tokens[i] for i in left)
    record: dict[str, Any] = {
        "address": cluster.address,
        "cluster_resources": {k: v for k, v in cluster.resources.items() if k in ("CPU", "GPU")},
        "gpus_per_worker": gpus,
        "threads_per_worker": opts.threads_per_worker if gpus <= 0 else None,
        "max_attempts": opts.max_attempts,
        "shards": [
            {
                "shard": s,
                "parts": parts,
                "tokens": sum(tokens[i] for i in parts),
                "status": "todo" if s in todo else "done before",
                "worker": None,
                "attempts": 0,
            }
            for s, parts in enumerate(shards)
        ],
        "workers": [],
    }
    if not todo:
        prog.start("rescore", 1, 1)
        return None, record
    prog.start("rescore", total)
    fault = parse_fault(os.environ.get(FAULT_ENV))
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_concurrency=2)(ShardScorer)
    args = (str(run.path), train, sampling, total, gpus, opts.threads_per_worker)

    def start(indices: Sequence[int]) -> list[_Worker]:
        actors = [remote.remote(*args, k, fault) for k in indices]
        try:
            infos = ray.get([a.info.remote() for a in actors])
        except ray.exceptions.RayError as e:
            for a in actors:
                ray.kill(a)
            raise MismatchError(f"a Ray worker could not start: {_cause(e)}") from None
        return [_Worker(k, a, i) for k, a, i in zip(indices, actors, infos, strict=True)]

    workers: list[_Worker] = []
    try:
        with timed(timings, "train_load"):
            workers = start(range(min(n_workers, len(todo))))
        record["workers"] = [dict(w.info) for w in workers]
        save(ray=record)
        with timed(timings, "rescore"):
            _drive(ray, workers, shards, todo, tokens, record, start, opts, prog, save)
        finals = ray.get([w.actor.progress.remote() for w in workers])
        for w, last in zip(workers, finals, strict=True):
            w.last = last  # each worker's final count (the last poll may predate its end)
    finally:
        for w in workers:
            ray.kill(w.actor)
    shown = {w["worker"]: w for w in record["workers"]}
    for w in workers:
        if w.last is not None:
            shown[w.index].update(tokens=w.last["tokens"], busy_s=round(w.last["busy_s"], 3))
    for w in shown.values():
        if w.get("busy_s"):
            w["tokens_per_s"] = round(w["tokens"] / w["busy_s"], 1)
    save(ray=record)
    return workers[0].info["per_position"] if workers else None, record


def _drive(
    ray: Any,
    workers: list[_Worker],
    shards: list[list[int]],
    todo: list[int],
    tokens: list[int],
    record: dict[str, Any],
    start: Callable[[Sequence[int]], list[_Worker]],
    opts: RayOptions,
    prog: Progress,
    save: Callable[..., None],
) -> None:
    """The driver's loop: hand out shards largest first, poll progress, retry failures."""
    queue = deque(todo)
    attempts = dict.fromkeys(todo, 0)
    done_parts: set[int] = set()  # parts finished in this job
    shown = 0
    next_index = len(workers)
    rows = {r["shard"]: r for r in record["shards"]}

    def tokens_done() -> int:
        cur = sum(w.last["current"] for w in workers if w.last and w.shard is not None)
        return sum(tokens[i] for i in done_parts) + cur

    while queue or any(w.shard is not None for w in workers):
        for w in workers:  # hand out
            if w.shard is None and queue:
                s = queue.popleft()
                w.shard, w.ref = s, w.actor.score_shard.remote(s, shards[s], attempts[s])
                rows[s].update(status="running", worker=w.index)
        busy = {w.ref: w for w in workers if w.shard is not None}
        finished, _ = ray.wait(list(busy), num_returns=1, timeout=POLL_S)
        for ref in finished:
            w = busy[ref]
            s, w.shard, w.ref = w.shard, None, None
            attempts[s] += 1
            rows[s]["attempts"] = attempts[s]
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                cause = _cause(e)
                rows[s].update(status="failed", cause=cause)
                dead = isinstance(e, ray.exceptions.RayActorError)
                if w.last:
                    done_parts.update(w.last["parts"])
                if attempts[s] >= opts.max_attempts:
                    save(ray=record)
                    raise MismatchError(
                        f"shard {s} (parts {', '.join(map(str, shards[s]))}) failed "
                        f"{attempts[s]} time(s), last on worker {w.index}: {cause}; the finished "
                        "parts are kept: run the same command with --resume to continue"
                    ) from None
                where = "on a new worker" if dead else "later"
                prog.log(
                    f"warning: shard {s} failed on worker {w.index} ({cause}); retrying it "
                    f"{where} (attempt {attempts[s] + 1} of {opts.max_attempts})"
                )
                if dead:
                    queue.appendleft(s)
                else:  # the worker lives on: the shard goes last, to another worker if any
                    queue.append(s)
                if dead:  # a replacement keeps the number of workers
                    workers.remove(w)
                    (new,) = start([next_index])
                    next_index += 1
                    workers.append(new)
                    record["workers"].append({**new.info, "replaces": w.index})
            else:
                done_parts.update(shards[s])
                rows[s].update(status="done", worker=w.index)
                rows[s].pop("cause", None)
            save(ray=record)
        _poll(ray, workers)
        now = tokens_done()
        if now > shown:
            prog.advance("rescore", now - shown)
            shown = now
        rates = [
            f"w{w.index} {w.last['tokens'] / w.last['busy_s']:.3g} tok/s"
            for w in workers
            if w.last and w.last["busy_s"] > 0
        ]
        if rates:
            prog.detail("rescore", ", ".join(rates))
    total = sum(tokens[i] for i in done_parts)
    if total > shown:
        prog.advance("rescore", total - shown)


def _poll(ray: Any, workers: list[_Worker]) -> None:
    """Collect the answers to the last progress calls and ask again (never blocking: a
    worker busy loading or dead answers later or never)."""
    for w in workers:
        if w.poll is not None:
            ready, _ = ray.wait([w.poll], timeout=0)
            if not ready:
                continue
            try:
                w.last = ray.get(w.poll)
            except ray.exceptions.RayError:
                pass  # a dead worker: its shard's call says so
        w.poll = w.actor.progress.remote()


# --- measure --data-parallel N: the inference side on N vLLM engines -------------------
#
# vLLM's offline `LLM` refuses data parallelism in one process, so each engine is a Ray
# actor (`ShardGenerator`) holding one `rollout.VllmEngine` with the run's own tensor and
# pipeline parallel sizes, over one shard of the prompts (a contiguous range of prompt ids,
# `pipeline.plan_prompt_shards`; its chunks are `pipeline.plan_chunks`'). Each actor writes
# its rollout parts into the run directory with `pipeline.generate_chunks`, the one-process
# code path: same parts, same seq_ids, same seeds per prompt. On a CPU each engine's OpenMP
# threads are bound to cores of its own (`cpu_bind`), so two engines never share a core.


def engine_shape(n: int, world: int, resources: dict[str, float]) -> tuple[float, int]:
    """(GPUs, CPUs) per engine for `n` engines of `world` = tensor x pipeline ranks each on a
    cluster holding `resources`: `world` GPUs each where the cluster has GPUs, else the CPUs
    shared out (at least one core per rank); one line if they do not fit (Ray would wait
    for them forever)."""
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if gpus > 0:
        if n * world > gpus:
            raise MismatchError(
                f"the Ray cluster has {gpus:g} GPU(s): --data-parallel {n} x {world} GPU(s) "
                "per engine (tensor x pipeline parallel size) do not fit"
            )
        return float(world), 1
    cores = int(cpus // n)
    if cores < world:
        raise MismatchError(
            f"the Ray cluster has {cpus:g} CPU(s): --data-parallel {n} needs {n * world} "
            f"(one core per engine{' rank' if world > 1 else ''})"
        )
    return 0.0, cores


def cpu_bind(index: int, cores: int, world: int, node_cpus: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for engine `index` holding `cores` cores: cores
    index*cores .. index*cores + cores - 1 (modulo the node's `node_cpus`), split into
    `world` rank groups joined by `|` (vLLM's syntax: one core list per tensor/pipeline
    rank), e.g. engine 1 of 1 core each: "1"; engine 0 of 4 cores, 2 ranks: "0-1|2-3"."""
    ids = [(index * cores + j) % max(node_cpus, 1) for j in range(cores)]
    per, extra = divmod(len(ids), world)
    groups, at = [], 0
    for r in range(world):
        g = ids[at : at + per + (r < extra)]
        at += len(g)
        contiguous = g == list(range(g[0], g[-1] + 1))
        groups.append(f"{g[0]}-{g[-1]}" if contiguous and len(g) > 1 else ",".join(map(str, g)))
    return "|".join(groups)


class ShardGenerator:
    """One vLLM engine (a Ray actor, made by `ray.remote(...)(ShardGenerator)`) over one
    shard of the prompts: on a CPU its OpenMP threads bound to its own cores (`cpu_bind`),
    on GPUs those Ray gave it (CUDA_VISIBLE_DEVICES). Threaded (two calls at once), so
    `progress` answers while `generate` runs."""

    def __init__(
        self,
        run_path: str,
        model_path: str,
        cfg: Any,
        index: int,
        cores: int,
        gpus: float,
        fail: bool = False,
    ) -> None:
        t0 = time.perf_counter()
        self.index, self.cfg, self.fail = index, cfg, fail
        self.bind: str | None = None
        if gpus <= 0:  # before vLLM reads it; overrides a bind the driver's env carried
            world = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
            self.bind = cpu_bind(index, cores, world, os.cpu_count() or cores)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.bind
        from .rollout import VllmEngine

        self.engine = VllmEngine(model_path, cfg)
        self.run = RunDir(Path(run_path))
        self.load_s = time.perf_counter() - t0
        self._lock = threading.Lock()
        self._completions = 0  # finished completions, this job
        self._tokens = 0  # generated tokens of the finished parts
        self._busy = 0.0
        self._since: float | None = None

    def info(self) -> dict[str, Any]:
        """Where this engine runs and how: node, pid, GPUs, CPU bind, KV cache, load time."""
        import ray

        return {
            "worker": self.index,
            "node": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "cpu_bind": self.bind,
            "kv_cache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE") if self.bind else None,
            "tensor_parallel_size": self.cfg.tensor_parallel_size,
            "pipeline_parallel_size": self.cfg.pipeline_parallel_size,
            "load_s": round(self.load_s, 3),
        }

    def generate(
        self, chunks: Sequence[Sequence[int]], mine: Sequence[int], prompt_ids: dict[int, Any]
    ) -> list[int]:
        """Generate this shard's chunks `mine` (indices into the run's `chunks`) that have
        no rollout part yet, part by part; returns those generated."""
        todo = [i for i in mine if not self.run.has_part(ROLLOUT, i)]
        if self.fail:
            raise RuntimeError(f"fault injected by {DP_FAULT_ENV}")

        def advance(n: int) -> None:
            with self._lock:
                self._completions += n

        for i in todo:  # one part at a time, so `progress` sees its tokens when it lands
            with self._lock:
                self._since = time.perf_counter()
            made = generate_chunks(self.engine, self.run, self.cfg, chunks, [i], prompt_ids,
                                   advance)  # fmt: skip
            with self._lock:
                self._busy += time.perf_counter() - (self._since or time.perf_counter())
                self._since, self._tokens = None, self._tokens + made
        return todo

    def progress(self) -> dict[str, Any]:
        """Completions so far, tokens of the finished parts and the seconds they took."""
        with self._lock:
            busy = self._busy + (time.perf_counter() - self._since if self._since else 0.0)
            return {"completions": self._completions, "tokens": self._tokens, "busy_s": busy}

    def close(self) -> None:
        """Shut the engine's processes down (before the training side loads)."""
        self.engine.close()


def generate_on_ray(
    run: RunDir,
    cfg: Any,
    model_path: str,
    prompt_ids: Sequence[Any],
    shards: Sequence[tuple[int, int]],
    chunks: Sequence[Sequence[int]],
    address: str | None = None,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    save: Callable[..., None] = lambda **_: None,
) -> dict[str, Any]:
    """The generate phase of `measure --data-parallel N`: one engine per shard of prompts
    (`shards`: prompt-id ranges [start, end); `chunks`: the run's chunks, each inside one
    shard) that still lacks a rollout part, on the Ray cluster at `address` (None: a local
    Ray on every core). One progress bar counts completions across the engines, with tokens
    per second per engine. Returns run.json's `data_parallel` record (size, address, the
    shard plan, each engine's node, GPUs or CPU bind), also given to `save(data_parallel=)`
    whenever it changes. A failing engine is one MismatchError naming its shard; the parts
    already written stay, so `--resume` continues without regenerating them."""
    prog = progress or Progress()
    timings = {} if timings is None else timings
    spp = cfg.samples_per_prompt
    mine = [[i for i, c in enumerate(chunks) if a <= c[0] < b] for a, b in shards]
    done = [all(run.has_part(ROLLOUT, i) for i in m) for m in mine]
    record: dict[str, Any] = {
        "size": len(shards),
        "address": None,
        "shards": [
            {
                "shard": k,
                "prompts": [a, b],
                "chunks": mine[k],
                "status": "done before" if done[k] else "todo",
                "worker": None,
            }
            for k, (a, b) in enumerate(shards)
        ],
        "workers": [],
    }
    total = sum(len(c) for c in chunks) * spp
    before = sum(len(chunks[i]) for i in range(len(chunks)) if run.has_part(ROLLOUT, i)) * spp
    prog.start("generate", total, before)
    todo = [k for k in range(len(shards)) if not done[k]]
    if not todo:  # a resumed run's rollouts are all there: its record stays as it was
        return record
    with connect(RayOptions(address=address)) as cluster:
        ray = cluster.ray
        world = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
        gpus, cores = engine_shape(len(shards), world, cluster.resources)
        record.update(
            address=cluster.address,
            cluster_resources={k: v for k, v in cluster.resources.items() if k in ("CPU", "GPU")},
            gpus_per_worker=gpus,
            cpus_per_worker=cores,
        )
        remote = ray.remote(num_cpus=cores if gpus <= 0 else 1, num_gpus=gpus,
                            max_concurrency=2)(ShardGenerator)  # fmt: skip
        fault = os.environ.get(DP_FAULT_ENV)
        actors = {
            k: remote.remote(str(run.path), model_path, cfg, k, cores, gpus, fault == str(k))
            for k in todo
        }
        try:
            with timed(timings, "engine_start"):
                try:
                    infos = ray.get([actors[k].info.remote() for k in todo])
                except ray.exceptions.RayError as e:
                    raise MismatchError(
                        f"a vLLM engine could not start on Ray: {_cause(e)}"
                    ) from None
            record["workers"] = infos
            save(data_parallel=record)
            with timed(timings, "generate"):
                last = _drive_generation(ray, actors, shards, chunks, mine, prompt_ids, record,
                                         prog, save, total - before, run.path)  # fmt: skip
        finally:
            closing = [a.close.remote() for a in actors.values()]
            ray.wait(closing, num_returns=len(closing), timeout=60)  # engines gone first
            for a in actors.values():
                ray.kill(a)
    for w in record["workers"]:
        p = last.get(w["worker"])
        if p is not None:
            w.update(completions=p["completions"], tokens=p["tokens"], busy_s=round(p["busy_s"], 3))
            if p["busy_s"] > 0:
                w["tokens_per_s"] = round(p["tokens"] / p["busy_s"], 1)
    save(data_parallel=record)
    return record


def _drive_generation(
    ray: Any,
    actors: dict[int, Any],
    shards: Sequence[tuple[int, int]],
    chunks: Sequence[Sequence[int]],
    mine: list[list[int]],
    prompt_ids: Sequence[Any],
    record: dict[str, Any],
    prog: Progress,
    save: Callable[..., None],
    todo_completions: int,
    run_path: Path,
) -> dict[int, dict[str, Any]]:
    """Start every engine on its shard, follow their progress on one bar until all are
    done, and return each engine's last progress. A failed shard is one line naming it,
    raised once the other engines have finished theirs (their parts are kept for
    `--resume`)."""
    rows = {r["shard"]: r for r in record["shards"]}
    refs = {}
    for k, a in actors.items():
        ids = {pid: list(prompt_ids[pid]) for pid in range(*shards[k])}
        refs[a.generate.remote(chunks, mine[k], ids)] = k
        rows[k].update(status="running", worker=k)
    last: dict[int, dict[str, Any]] = {}
    polls: dict[int, Any] = {}
    failed: list[int] = []
    shown = 0
    while refs:
        finished, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_S)
        for ref in finished:
            k = refs.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                rows[k].update(status="failed", cause=_cause(e))
                failed.append(k)
                prog.log(f"warning: data-parallel shard {k} failed: {_cause(e)}")
            else:
                rows[k]["status"] = "done"
            save(data_parallel=record)
        for k, a in actors.items():  # never blocking: an answer is collected next time
            if k in polls:
                ready, _ = ray.wait([polls[k]], timeout=0)
                if not ready:
                    continue
                try:
                    last[k] = ray.get(polls[k])
                except ray.exceptions.RayError:
                    pass  # a dead engine: its generate call says so
            polls[k] = a.progress.remote()
        now = min(sum(p["completions"] for p in last.values()), todo_completions)
        if now > shown:
            prog.advance("generate", now - shown)
            shown = now
        rates = [f"e{k} {p['tokens'] / p['busy_s']:.3g} tok/s"
                 for k, p in sorted(last.items()) if p["busy_s"] > 0 and p["tokens"]]  # fmt: skip
        if rates:
            prog.detail("generate", ", ".join(rates))
    if failed:
        k = failed[0]
        a, b = shards[k]
        raise MismatchError(
            f"data-parallel shard {k} (prompts {a}-{b - 1}) failed on its engine: "
            f"{rows[k]['cause']}; the finished parts are kept: resume with `mismatch measure "
            f"--resume --out {run_path}`"
        )
    last.update(zip(actors, ray.get([a.progress.remote() for a in actors.values()]), strict=True))
    if todo_completions > shown:
        prog.advance("generate", todo_completions - shown)
    return last


__all__ = [
    "DP_FAULT_ENV",
    "FAULT_ENV",
    "MAX_ATTEMPTS",
    "RAY_EXTRA",
    "Cluster",
    "RayOptions",
    "ShardGenerator",
    "ShardScorer",
    "connect",
    "cpu_bind",
    "engine_shape",
    "generate_on_ray",
    "import_ray",
    "plan_shards",
    "score_on_ray",
    "worker_shape",
]
