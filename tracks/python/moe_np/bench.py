"""`bench`: the 22 scenarios of CONTRACT §10 for this track, with the JSON schema of
`moe bench` (docs/bench-results.json), metadata.language = "python".

Each scenario runs in a fresh child process (`bench --child ID`), so its peak RSS
is its own, with BLAS held to one thread. What only a garbage-collected runtime
has is measured for real:
  * gc: every collection of CPython's cyclic collector during the timed runs,
    timed by `gc.callbacks` (start → stop); gc_throughput = 1 − gc time / wall time.
  * alloc_bytes: tracemalloc's peak above its start during one extra, untimed run
    (tracemalloc slows every allocation, so it stays off while timing). This is the
    largest amount live at once, a lower bound of the bytes a run allocates.
Parallel scenarios use processes (multiprocessing, as the published Python track):
T independent models, one run each, the first in this process, the others in
forked workers pinned to their own cores; their CPU and GC time are added in.
"""

import fnmatch
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig, TrainConfig
from .layers import rmsnorm_forward
from .metrics import static_metrics
from .model import Batch, Model
from .optim import Trainer


@dataclass(frozen=True)
class Scenario:
    """One scenario: id, axis, kind (forward, train_step, matmul, softmax, rmsnorm,
    cold, parallel_forward, parallel_train) and its sizes."""

    id: str
    axis: str
    kind: str
    config: str = "tiny"
    batch: int = 0
    seq: int = 0
    threads: int = 1

    def params(self):
        """The scenario's parameters as the Rust suite reports them."""
        if self.kind in ("forward", "train_step"):
            return {"config": self.config, "op": self.kind, "batch": self.batch, "seq_len": self.seq}
        if self.kind.startswith("parallel"):
            op = "forward" if self.kind == "parallel_forward" else "train_step"
            return {"config": "tiny", "op": op, "threads": self.threads, "batch": self.batch, "seq_len": self.seq}
        return {
            "matmul": {"op": "matmul", "m": 64, "k": 64, "n": 64},
            "softmax": {"op": "softmax", "n": 1000},
            "rmsnorm": {"op": "rmsnorm", "shape": [2, 32, 64]},
            "cold": {"config": "tiny", "op": "build + first forward", "batch": 1, "seq_len": 8},
        }[self.kind]

    def tokens(self):
        """Tokens one run processes (rows for the kernels)."""
        return {"matmul": 64, "rmsnorm": 64, "softmax": 1, "cold": 8}.get(
            self.kind, self.threads * self.batch * self.seq)

    def flops(self):
        """Counted FLOPs of one run (CONTRACT §10)."""
        tiny = ModelConfig.preset("tiny")
        known = {"matmul": 524_288.0, "softmax": 4_000.0, "rmsnorm": 12_288.0,
                 "cold": forward_flops(tiny, 1, 8)}
        if self.kind in known:
            return known[self.kind]
        config = ModelConfig.preset(self.config)
        count = train_flops if "train" in self.kind else forward_flops
        return self.threads * count(config, self.batch, self.seq)


def scenarios():
    """The 22 scenarios, in the contract's order."""
    out = [Scenario("mem_train_step", "memory", "train_step", batch=2, seq=8)]
    out += [Scenario(f"mem_scale_batch_{b}", "memory", "forward", batch=b, seq=32) for b in (1, 2, 4, 8)]
    out += [Scenario(f"mem_scale_seq_{s}", "memory", "forward", batch=2, seq=s) for s in (8, 16, 32, 64)]
    out += [Scenario("kernel_matmul", "compiler", "matmul"), Scenario("kernel_softmax", "compiler", "softmax"),
            Scenario("kernel_rmsnorm", "compiler", "rmsnorm"),
            Scenario("dispatch_warm", "type_system", "forward", batch=2, seq=32),
            Scenario("dispatch_cold", "type_system", "cold")]
    out += [Scenario(f"parallel_T{t}", "parallel", "parallel_forward", batch=2, seq=32, threads=t) for t in (1, 2, 4)]
    out += [Scenario(f"parallel_train_T{t}", "parallel", "parallel_train", batch=2, seq=8, threads=t)
            for t in (1, 2, 4)]
    out += [Scenario("scale_forward_256", "scale", "forward", "small", 2, 32),
            Scenario("scale_train_256", "scale", "train_step", "small", 2, 8)]
    return out


def forward_flops(c, batch, seq):
    """Matrix FLOPs of one forward: 2 per multiply-add, attention full-square, active experts only."""
    t = batch * seq
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    per_layer = (2 * t * c.hidden_dim * qkv + 2 * t * c.n_heads * c.head_dim * c.hidden_dim
                 + 4 * batch * c.n_heads * seq * seq * c.head_dim + router_flops(c, t)
                 + t * c.top_k * 6 * c.hidden_dim * c.ffn_dim)
    return float(c.n_layers * per_layer + 2 * t * c.hidden_dim * c.vocab_size)


def router_flops(c, tokens):
    return 2 * tokens * c.hidden_dim * c.n_experts


def train_flops(c, batch, seq):
    """Forward + a backward of twice the forward, without the routers' backward (published convention)."""
    return 3 * forward_flops(c, batch, seq) - 2 * c.n_layers * router_flops(c, batch * seq)


def inputs(batch, seq):
    """Flat index i over B·S: id = i mod 1000, target = (i + 1) mod 1000."""
    i = np.arange(batch * seq)
    return Batch((i % 1000).reshape(batch, seq), ((i + 1) % 1000).reshape(batch, seq))


# ---------------------------------------------------------------- runners

class ForwardRun:
    def __init__(self, config, seed, batch, seq):
        self.model, self.batch = Model.new(config, seed), inputs(batch, seq)
        self.out = None

    def run(self):
        self.out = self.model.forward(self.batch.ids)

    def output(self):
        return self.out


class TrainRun:
    def __init__(self, config, seed, batch, seq):
        self.trainer = Trainer(Model.new(config, seed), TrainConfig(seed=seed))
        self.batch, self.out = inputs(batch, seq), None

    def run(self):
        s = self.trainer.train_step(self.batch)
        self.out = np.array([s.loss, s.ce, s.aux, s.grad_norm], np.float32)

    def output(self):
        return self.out


class KernelRun:
    """matmul C = A·B (64³), softmax of 1000 normals into a preallocated buffer, or RMSNorm on [2, 32, 64]."""

    def __init__(self, kind, seed):
        rng = np.random.default_rng(seed)
        normals = lambda *shape: rng.standard_normal(shape).astype(np.float32)
        self.kind = kind
        if kind == "matmul":
            self.a, self.b, self.out = normals(64, 64), normals(64, 64), np.zeros((64, 64), np.float32)
        elif kind == "softmax":
            self.x, self.out = normals(1000), np.zeros(1000, np.float32)
        else:
            self.x, self.gamma, self.out = normals(2, 32, 64), np.ones(64, np.float32), None

    def run(self):
        if self.kind == "matmul":
            np.matmul(self.a, self.b, out=self.out)
        elif self.kind == "softmax":
            np.subtract(self.x, self.x.max(), out=self.out)
            np.exp(self.out, out=self.out)
            self.out /= self.out.sum()
        else:
            self.out, _ = rmsnorm_forward(self.x, self.gamma, 1e-6)

    def output(self):
        return self.out


class ColdRun:
    """Build the tiny model, then its first forward (B 1, S 8)."""

    def __init__(self, seed):
        self.seed, self.out = seed, None

    def run(self):
        self.out = Model.new(ModelConfig.preset("tiny"), self.seed).forward(inputs(1, 8).ids)

    def output(self):
        return self.out


class GcClock:
    """Counts and times the cyclic collector's pauses through gc.callbacks."""

    def __init__(self):
        self.count, self.ns, self._start = 0, 0, 0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter_ns()
        else:
            self.count += 1
            self.ns += time.perf_counter_ns() - self._start

    def reset(self):
        self.count, self.ns = 0, 0


def _worker(conn, make, core):
    """A parallel worker: builds its runner, then runs it on every request and
    answers (cpu ns, gc pauses, gc ns) of that run; answers its peak RSS on stop."""
    try:
        os.sched_setaffinity(0, {core})
    except OSError:
        pass
    runner, clock = make(), GcClock()
    conn.send("ready")
    while conn.recv() == "run":
        clock.reset()
        cpu = time.process_time_ns()
        runner.run()
        conn.send((time.process_time_ns() - cpu, clock.count, clock.ns))
    conn.send(peak_rss_bytes())


class Parallel:
    """`threads` runners at once, one per process: the first here, the others in
    forked workers. One run = every runner runs once; it ends when all have."""

    def __init__(self, threads, make):
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        cores = sorted(os.sched_getaffinity(0))
        self.workers = []
        for i in range(1, threads):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(there, make, cores[i % len(cores)]), daemon=True)
            proc.start()
            self.workers.append((proc, here))
        for _, conn in self.workers:
            conn.recv()
        os.sched_setaffinity(0, {cores[0]})
        self.own = make()
        self.extra_cpu_ns = self.extra_gc_count = self.extra_gc_ns = 0

    def run(self):
        for _, conn in self.workers:
            conn.send("run")
        self.own.run()
        for _, conn in self.workers:
            cpu, count, ns = conn.recv()
            self.extra_cpu_ns += cpu
            self.extra_gc_count += count
            self.extra_gc_ns += ns

    def output(self):
        return self.own.output()

    def close(self):
        """Stops the workers; returns the sum of their peak RSS."""
        rss = 0
        for proc, conn in self.workers:
            conn.send("stop")
            rss += conn.recv()
            proc.join()
        return rss


def prepare(s, seed):
    """The runner of scenario `s`."""
    if s.kind == "forward":
        return ForwardRun(ModelConfig.preset(s.config), seed, s.batch, s.seq)
    if s.kind == "train_step":
        return TrainRun(ModelConfig.preset(s.config), seed, s.batch, s.seq)
    if s.kind == "cold":
        return ColdRun(seed)
    if s.kind.startswith("parallel"):
        cls = ForwardRun if s.kind == "parallel_forward" else TrainRun
        return Parallel(s.threads, lambda: cls(ModelConfig.preset("tiny"), seed, s.batch, s.seq))
    return KernelRun(s.kind, seed)


# ---------------------------------------------------------------- measuring

def cpu_time_ns():
    """User + system CPU time of this process, from getrusage."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return int((u.ru_utime + u.ru_stime) * 1e9)


def peak_rss_bytes():
    """Peak resident set of this process in bytes (getrusage reports KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def order_stats(sample):
    """median, p95, min, max, iqr (nearest-rank percentiles, as the Rust suite)."""
    s = sorted(sample)
    at = lambda q: s[min(round(q * (len(s) - 1)), len(s) - 1)]
    n = len(s)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    return {"median_ns": median, "p95_ns": at(0.95), "min_ns": s[0], "max_ns": s[-1],
            "iqr_ns": at(0.75) - at(0.25)}


def measure(s, trials, warmup, seed):
    """Runs scenario `s` in this process and returns its result (schema of `moe bench`)."""
    cores = len(os.sched_getaffinity(0))
    runner = prepare(s, seed)
    for _ in range(warmup):
        runner.run()
    probe = time.perf_counter_ns()
    runner.run()
    once = time.perf_counter_ns() - probe
    reps = 1_000_000 // max(once, 1) + 1 if once < 1_000_000 else 1
    clock = GcClock()
    workers = runner if isinstance(runner, Parallel) else None  # their CPU and GC time count too
    worker_cpu = lambda: workers.extra_cpu_ns if workers else 0
    wall, cpu = [], []
    for _ in range(trials):
        cpu0, start = cpu_time_ns() + worker_cpu(), time.perf_counter_ns()
        for _ in range(reps):
            runner.run()
        wall.append((time.perf_counter_ns() - start) // reps)
        cpu.append((cpu_time_ns() + worker_cpu() - cpu0) // reps)
    gc_count = clock.count + (workers.extra_gc_count if workers else 0)
    gc_ns = clock.ns + (workers.extra_gc_ns if workers else 0)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    runner.run()
    alloc = max(tracemalloc.get_traced_memory()[1] - base, 0)
    tracemalloc.stop()
    out = np.asarray(runner.output(), np.float64).ravel()
    rss = peak_rss_bytes() + (workers.close() if workers else 0)
    stats = order_stats(wall)
    median_s = stats["median_ns"] / 1e9
    timed_ns = sum(wall) * reps
    finite = out[np.isfinite(out)]
    return {
        "id": s.id, "axis": s.axis, "params": s.params(), "warmup_runs": warmup, "trial_runs": trials,
        "reps_per_trial": reps, "timings_ns": wall, "cpu_times_ns": cpu, **stats,
        "cpu_median_ns": order_stats(cpu)["median_ns"],
        "memory": {"peak_rss_bytes": rss, "alloc_bytes": alloc},
        "gc": {"total_gc_time_ns": gc_ns, "gc_pause_count": gc_count},
        "numerical": {"nan_count": int(np.isnan(out).sum()), "inf_count": int(np.isinf(out).sum()),
                      "max_abs": float(np.abs(finite).max()) if finite.size else 0.0},
        "throughput_tokens_per_sec": s.tokens() / median_s,
        "derived": {"alloc_rate_bytes_per_sec": alloc / median_s,
                    "gc_throughput": 1.0 - gc_ns / timed_ns if timed_ns else 1.0,
                    "gflops": s.flops() / median_s / 1e9, "pct_of_peak": None,
                    "cores_used": min(s.threads, cores)},
    }


def metadata(trials, warmup, seed, command):
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                   "unknown")
        distro = platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
    except OSError:
        cpu, distro = "unknown", platform.system()
    return {
        "language": "python",
        "language_version": f"CPython {platform.python_version()}, NumPy {np.__version__}",
        "os": f"{distro}, Linux {platform.release()}",
        "cpu_model": cpu, "threads": os.cpu_count(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "n_trials": trials, "n_warmup": warmup, "seed": seed, "fma_peak_gflops": None,
        "intra_op_threads": 1, "command": command,
        "alloc_bytes_method": "tracemalloc peak above start during one untimed run (lower bound)",
        "gc_method": "gc.callbacks start→stop over the timed runs (all processes)",
    }


def suite_derived(results):
    find = {r["id"]: r for r in results}

    def ratio(a, b, key):
        return find[a][key] / find[b][key] if a in find and b in find else None

    return {
        "speedup_forward_t2": ratio("parallel_T2", "parallel_T1", "throughput_tokens_per_sec"),
        "speedup_forward_t4": ratio("parallel_T4", "parallel_T1", "throughput_tokens_per_sec"),
        "speedup_train_t2": ratio("parallel_train_T2", "parallel_train_T1", "throughput_tokens_per_sec"),
        "speedup_train_t4": ratio("parallel_train_T4", "parallel_train_T1", "throughput_tokens_per_sec"),
        "cold_warm_ratio": ratio("dispatch_cold", "dispatch_warm", "median_ns"),
        "train_forward_ratio": ratio("mem_train_step", "dispatch_warm", "median_ns"),
    }


def main(args):
    """`bench`: every selected scenario in a child process; JSON to --json."""
    trials, warmup = (3, 1) if args.quick else (args.trials, args.warmup)
    chosen = [s for s in scenarios() if fnmatch.fnmatchcase(s.id, args.scenario)]
    if args.child:
        s = next((s for s in chosen if s.id == args.child), None)
        if s is None:
            raise SystemExit(f"error: no scenario {args.child!r}")
        print(json.dumps(measure(s, trials, warmup, args.seed)))
        return
    if not chosen:
        raise SystemExit(f"error: no benchmark scenario matches {args.scenario!r}")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    results = []
    for i, s in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {s.id}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "moe_np", "bench", "--child", s.id, "--trials", str(trials),
               "--warmup", str(warmup), "--seed", str(args.seed)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: scenario {s.id} failed:\n{done.stderr}")
        results.append(json.loads(done.stdout))
        r = results[-1]
        print(f"    median {r['median_ns'] / 1e6:.3f} ms, gc {r['gc']['gc_pause_count']} pauses",
              file=sys.stderr, flush=True)
    command = "tracks/python/run bench " + " ".join(sys.argv[2:])
    report = {"metadata": metadata(trials, warmup, args.seed, command.strip()),
              "static_metrics": static_metrics(Path(__file__).resolve().parent),
              "scenarios": results, "derived": suite_derived(results)}
    text = json.dumps(report, indent=1) + "\n"
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    else:
        print(text, end="")
