"""The project's trainer on GPUs: what `workbench train --device cuda` runs, timed in one call
(device GPUs; not a test).

(a) One GPU, at 768x24576 k32 B4096 and 2048x65536 k64 B4096 (TopK, aux none, constant lr
    4e-4, the synthetic batches of bench/gpu_train.py): tokens/s of train_step on
    device-resident batches for sae.trainer.Trainer with the fused step (what `workbench
    train` runs on CUDA for TopK) and with the autograd step, next to
    bench/gpu_train.py's "ours (fused step, graph)" (the same kernels as one CUDA graph),
    in the same process so the ratios are from one run; plus peak memory and FVU on a
    held-out batch after equal tokens. With --aux auxk each trainer runs twice and the
    second run is timed: the dead-feature count changes the aux products' shapes from step
    to step, and whichever method met a shape first would pay its one-time costs (kernel
    compilation, allocator growth); dead_features_at_end says how many AuxK had.
(b) Data parallel: the same configs trained through Trainer.fit on one GPU and through
    sae.distributed.train_data_parallel under `torchrun --nproc_per_node 2` (NCCL), on the
    same data (a GPU-resident TensorSource, so the data pipeline is not what is timed), log
    every 50 steps. Checks: both ranks end with identical weights (torch.equal), and the
    2-process weights match the 1-process ones within REL_TOL (relative Frobenius norm of
    the difference, per tensor), FVU within FVU_TOL. tokens/s over steps WARM..steps, timed
    on the host between two synchronised points of the batch stream.
(c) Checks of the CUDA step itself, for both trainers: no host-device sync inside train_step
    (torch.cuda.set_sync_debug_mode("warn") over steps on CPU and on GPU batches: warnings
    are counted), and the NaN/Inf guard (NaN data: one SAEError naming the steps, and
    the checkpoint on disk is from before them and finite).

(p) (--parts p) Where a Trainer.train_step goes: host time to issue one step against the
    synced step, and torch.profiler's per-op device times over 10 steps.

    python3 bench/gpu_trainer.py [--parts c,a,b] [--json out.json]   # results: BENCHMARKS.md
    python3 bench/gpu_trainer.py --parts p
    python3 bench/gpu_trainer.py --smoke      # CPU, tiny shapes, gloo: checks the script runs

The project imports duckdb (through workbench); the device lacks it. Here, in an ignored
folder: `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
manylinux_2_28_x86_64 -d .whl_duckdb duckdb==2.0.0`; carry .whl_duckdb and start with
`pip install -q --no-index --no-deps --target /tmp/site .whl_duckdb/*.whl` and
PYTHONPATH=/tmp/site:$PWD.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import torch

from sae.config import TrainConfig
from sae.data import TensorSource
from sae.errors import SAEError
from sae.trainer import Trainer

CONFIGS = [(768, 24576, 32, 4096), (2048, 65536, 64, 4096)]
SMOKE_CONFIGS = [(16, 96, 4, 64), (24, 128, 8, 64)]
LR = 4e-4
WARM = 20
LOG_EVERY = 50
REL_TOL = 1e-3
PRECISION = "bf16"  # --precision
AUX = {"aux": "none"}  # --aux, --dead-tokens
FVU_TOL = 0.01
# NVLink multicast stays off (the device's rule); torchrun's children inherit these
for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ[_name] = "0" if _name == "NCCL_NVLS_ENABLE" else "1"


def config_for(d_in: int, d_sae: int, k: int, B: int, steps: int, device: str, **kw) -> TrainConfig:
    base = {"arch": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "tokens": steps * B, "batch_size": B, "lr": LR,
            "device": device, "aux": "none", "warmup_steps": 0, "decay_fraction": 0.0, "init_tokens": B,
            "log_every": LOG_EVERY, "seed": 0, "precision": PRECISION, **AUX}
    base.update(kw)
    return TrainConfig(**base)


def cpu_pool(d_in: int, k: int, B: int, n: int, seed: int) -> list[torch.Tensor]:
    """The smoke run's data: gpu_train.synthetic_pool's recipe on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(8 * d_in, d_in, generator=gen)
    V /= V.norm(dim=1, keepdim=True)
    freq = 1.0 / torch.arange(1, 8 * d_in + 1, dtype=torch.float32) ** 0.7
    per = max(k // 2, 1)
    out = []
    for _ in range(n):
        idx = torch.multinomial(freq, B * per, replacement=True, generator=gen).view(B, per)
        mag = torch.empty(B, per).exponential_(generator=gen)
        out.append(torch.nn.functional.embedding_bag(idx, V, per_sample_weights=mag, mode="sum") + 0.05 * torch.randn(B, d_in, generator=gen))
    return out


def pool_for(ci: int, shape: tuple[int, int, int, int], n: int, cuda: bool) -> list[torch.Tensor]:
    d_in, _, k, B = shape
    if cuda:
        from gpu_train import synthetic_pool

        return synthetic_pool(d_in, k, B, n, seed=ci)
    return cpu_pool(d_in, k, B, n, seed=ci)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat.float()).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# ---- (a) one GPU ---------------------------------------------------------------------------
class TrainStep:
    """Trainer.train_step with one step kind ("autograd"; "fused": what `workbench train`
    runs on CUDA for TopK, replayed as a CUDA graph unless graph=False) on device-resident
    batches."""

    def __init__(self, shape, x0: torch.Tensor, device: str, kind: str = "autograd", graph: bool = True) -> None:
        d_in, d_sae, k, B = shape
        self.name = f"project Trainer.train_step ({kind} step)" + ("" if graph else " (no graph)")
        self.trainer = Trainer(config_for(d_in, d_sae, k, B, 10**6, device), TensorSource(x0.cpu()), None, [], step=kind)
        self.trainer._initialise()
        if not graph and kind == "fused":
            self.trainer.stepper = self.trainer.stepper.inner  # the fused step without its CudaGraphStep

    def dead_features(self) -> int:
        return int((self.trainer.tokens_since_fired >= self.trainer.config.dead_tokens).sum())

    def step(self, x: torch.Tensor) -> None:
        self.trainer.train_step(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainer.model(x * self.trainer.input_scale)[0] / self.trainer.input_scale


def time_method(make, pool: list[torch.Tensor], x_eval: torch.Tensor, steps: int) -> dict:
    cuda = pool[0].is_cuda
    if cuda:
        from gpu_train import run_method

        made = []
        row = run_method(lambda: made.append(make()) or made[0], pool, x_eval, steps)
        if isinstance(made[0], TrainStep):  # how many features AuxK had to work on at the end
            row["dead_features_at_end"] = made[0].dead_features()
        return row
    method = make()
    for i in range(WARM):
        method.step(pool[i % len(pool)])
    t0 = time.perf_counter()
    for i in range(WARM, steps):
        method.step(pool[i % len(pool)])
    ms = (time.perf_counter() - t0) * 1e3 / (steps - WARM)
    return {"method": method.name, "ms_per_step": ms, "tok_per_s": len(pool[0]) / ms * 1e3, "peak_gib": float("nan"),
            "fvu": fvu(x_eval, method.reconstruct(x_eval))}


def part_a(shapes, steps: int, cuda: bool) -> list[dict]:
    rows = []
    for ci, shape in enumerate(shapes):
        rows += one_gpu(ci, shape, steps, cuda)
        if cuda:
            torch.cuda.empty_cache()
    return rows


def one_gpu(ci: int, shape: tuple[int, int, int, int], steps: int, cuda: bool) -> list[dict]:
    d_in, d_sae, k, B = shape
    label = f"{d_in}x{d_sae} k{k} B{B}"
    pool = pool_for(ci, shape, 9, cuda)
    x_eval = pool.pop()
    device = "cuda" if cuda else "cpu"
    makers = [("project Trainer.train_step (autograd step)", lambda: TrainStep(shape, pool[0], device))]
    floor = None
    if cuda:
        from gpu_train import TRAINER_SETTINGS, OursFusedStep, encoder_floor_ms

        floor = B / encoder_floor_ms(d_in, d_sae, B) * 1e3
        makers = [
            ("ours (fused step, graph)", lambda: OursFusedStep(d_in, d_sae, k, pool[0], graph=True, **TRAINER_SETTINGS)),
            ("project Trainer.train_step (fused step)", lambda: TrainStep(shape, pool[0], device, "fused")),
            ("project Trainer.train_step (fused step) (no graph)", lambda: TrainStep(shape, pool[0], device, "fused", graph=False)),
            *makers,
        ]
    rows = []
    for name, make in makers:
        try:
            row = time_method(make, pool, x_eval, steps)
            if AUX["aux"] == "auxk":  # the first pass meets each dead-feature count's shapes first (cuBLAS, allocator)
                row = time_method(make, pool, x_eval, steps)
        except Exception as exc:  # reported, not hidden
            traceback.print_exc()
            row = {"method": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        row.update(config=label, steps=steps, floor_tok_per_s=floor)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    return rows


# ---- (b) data parallel ---------------------------------------------------------------------
class TimedSource:
    """A source that synchronises the device and reads the clock when batch WARM and batch
    `stop` are asked for (fit asks for batch `stop` after finishing step stop-1)."""

    def __init__(self, inner: TensorSource, stop: int) -> None:
        self.inner, self.stop, self.d_in = inner, stop, inner.d_in
        self.marks: dict[int, float] = {}

    def batches(self, batch_size: int, start_batch: int = 0):
        for i, batch in enumerate(self.inner.batches(batch_size, start_batch), start_batch):
            if i in (WARM, self.stop):
                sync()
                self.marks[i] = time.perf_counter()
            yield batch

    def describe(self) -> dict:
        return self.inner.describe()

    def tokens_per_s(self, batch_size: int) -> float:
        return (self.stop - WARM) * batch_size / (self.marks[self.stop] - self.marks[WARM])


def ddp_worker(data_path: str, cfg_json: str, out_dir: str) -> None:
    """Runs under torchrun: one rank of train_data_parallel on its GPU (or CPU, gloo)."""
    from sae.distributed import train_data_parallel

    cfg = TrainConfig.from_dict(json.loads(cfg_json))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    data = torch.load(data_path)
    if cfg.device.startswith("cuda"):
        data = data.to(f"cuda:{local}")
    source = TimedSource(TensorSource(data, seed=1), cfg.steps)
    # NCCL all-reduce time of one gradient's size (what DDP adds to each step), then train
    from sae.distributed import init_process_group

    init_process_group()
    dev = torch.device(f"cuda:{local}") if cfg.device.startswith("cuda") else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    grad = torch.ones(2 * cfg.d_in * cfg.d_sae + cfg.d_sae + cfg.d_in, device=dev)
    for _ in range(3):
        torch.distributed.all_reduce(grad)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        torch.distributed.all_reduce(grad)
    sync()
    allreduce_ms = (time.perf_counter() - t) / 5 * 1e3
    del grad
    model = train_data_parallel(cfg, source)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    tok = source.tokens_per_s(cfg.batch_size) if cfg.steps > WARM else None
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"tok_per_s": tok, "allreduce_ms": allreduce_ms}))


def run_single(shape, steps: int, batch: int, data: torch.Tensor, x_eval: torch.Tensor, device: str) -> dict:
    """Trainer.fit in this process on one device: weights (CPU), tokens/s, FVU on x_eval."""
    d_in, d_sae, k, _ = shape
    source = TimedSource(TensorSource(data, seed=1), steps)
    trainer = Trainer.start(config_for(d_in, d_sae, k, batch, steps, device), source, step="autograd")
    model = trainer.fit(progress=False)
    sync()
    scale = trainer.input_scale
    with torch.no_grad():
        out = {"fvu": fvu(x_eval * scale, model(x_eval * scale)[0]), "scale": scale,
               "tok_per_s": source.tokens_per_s(batch) if steps > WARM else None,
               "state": {k_: v.detach().cpu() for k_, v in model.state_dict().items()}}
    del trainer, model, source
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def run_ddp(shape, steps: int, batch: int, data_path: Path, x_eval: torch.Tensor, scale: float, device: str) -> dict:
    """train_data_parallel under torchrun, 2 processes: rank weights, tokens/s (rank 0), FVU."""
    d_in, d_sae, k, _ = shape
    cfg = config_for(d_in, d_sae, k, batch, steps, device)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--ddp-worker", str(data_path), json.dumps(cfg.to_dict()), tmp]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr[-2500:]}")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in (0, 1)]
        info = json.loads(Path(tmp, "rank0.json").read_text())
    from sae.model import SparseAutoencoder
    from sae.rules import TopKRule

    twin = SparseAutoencoder(d_in, d_sae, TopKRule(k))
    twin.load_state_dict(ranks[0])
    twin = twin.to(x_eval.device)
    with torch.no_grad():
        f = fvu(x_eval * scale, twin(x_eval * scale)[0])
    return {"ranks": ranks, "tok_per_s": info["tok_per_s"], "allreduce_ms": info["allreduce_ms"], "fvu": f, "wall_s": wall}


def rel_diff(a: dict, b: dict) -> dict:
    """Per tensor ||a - b|| / ||b|| (floating tensors)."""
    return {n: float((a[n].float() - b[n].float()).norm() / b[n].float().norm().clamp(min=1e-30))
            for n in b if b[n].is_floating_point() and b[n].numel() > 0}


def part_b(shapes, steps: int, check_steps: list[int], cuda: bool, n_batches: int) -> list[dict]:
    """Per config: for each step count, 1 process vs 2 (same global batch B) and 1 process vs
    a repeat of itself (the run-to-run baseline); then tokens/s with a global batch of 2B
    (B per GPU) on 2 GPUs against 1 GPU at 2B and at B."""
    rows = []
    device = "cuda" if cuda else "cpu"
    for ci, shape in enumerate(shapes):
        d_in, d_sae, k, B = shape
        label = f"{d_in}x{d_sae} k{k} B{B}"
        pool = pool_for(ci, shape, n_batches + 1, cuda)
        x_eval = pool.pop()
        data = torch.cat(pool)
        del pool
        with tempfile.TemporaryDirectory() as tmp:
            data_path = Path(tmp) / "data.pt"
            torch.save(data.cpu(), data_path)
            for n in sorted(set(check_steps + [steps])):
                row: dict = {"config": label, "kind": "equal global batch", "global_batch": B, "steps": n}
                try:
                    one = run_single(shape, n, B, data, x_eval, device)
                    again = run_single(shape, n, B, data, x_eval, device)
                    two = run_ddp(shape, n, B, data_path, x_eval, one["scale"], device)
                    row.update(
                        ranks_identical=all(torch.equal(two["ranks"][0][t], two["ranks"][1][t]) for t in one["state"]),
                        rel_diff_two_vs_one=rel_diff(two["ranks"][0], one["state"]),
                        rel_diff_one_repeat=rel_diff(again["state"], one["state"]),
                        one_gpu_fvu=one["fvu"], two_gpu_fvu=two["fvu"],
                        one_gpu_tok_per_s=one["tok_per_s"], two_gpu_tok_per_s=two["tok_per_s"], two_gpu_wall_s=two["wall_s"],
                    )
                    row["allreduce_ms_of_grad_size"] = two["allreduce_ms"]
                    if n == steps:  # what one rank's share of the batch costs without DDP
                        row["one_gpu_half_batch_tok_per_s"] = run_single(shape, n, B // 2, data, x_eval, device)["tok_per_s"]
                    row["within_tol"] = (max(row["rel_diff_two_vs_one"].values()) <= REL_TOL
                                         and abs(two["fvu"] - one["fvu"]) <= FVU_TOL * one["fvu"])
                except Exception as exc:  # reported, not hidden
                    traceback.print_exc()
                    row["error"] = f"{type(exc).__name__}: {exc}"[:3000]
                rows.append(row)
                print(json.dumps(row), flush=True)
            row = {"config": label, "kind": "B per GPU", "global_batch": 2 * B, "steps": steps}
            try:
                one_2b = run_single(shape, steps, 2 * B, data, x_eval, device)
                two = run_ddp(shape, steps, 2 * B, data_path, x_eval, one_2b["scale"], device)
                row.update(one_gpu_tok_per_s=one_2b["tok_per_s"], two_gpu_tok_per_s=two["tok_per_s"],
                           ranks_identical=all(torch.equal(two["ranks"][0][t], two["ranks"][1][t]) for t in one_2b["state"]),
                           rel_diff_two_vs_one=rel_diff(two["ranks"][0], one_2b["state"]),
                           one_gpu_fvu=one_2b["fvu"], two_gpu_fvu=two["fvu"])
            except Exception as exc:  # reported, not hidden
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {exc}"[:3000]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del data, x_eval
        if cuda:
            torch.cuda.empty_cache()
    return rows


# ---- (c) checks of the step ----------------------------------------------------------------
def part_c(cuda: bool) -> dict:
    out: dict = {}
    device = "cuda" if cuda else "cpu"
    d_in, d_sae, k, B = (256, 4096, 16, 512) if cuda else (16, 96, 4, 64)
    pool = cpu_pool(d_in, k, B, 4, seed=5)
    # no host sync inside a step (device batches, then CPU batches through pinned memory)
    for kind in ("autograd", "fused") if cuda else ("autograd",):
        step = TrainStep((d_in, d_sae, k, B), pool[0], device, kind)
        for x in pool:  # warm-up: Triton compiles, allocator fills
            step.step(x.to(device))
        gpu_batches = [x.to(device) for x in pool]
        sync()
        if not cuda:
            continue
        for label, batches in ((f"{kind} step, device batches", gpu_batches), (f"{kind} step, CPU batches", pool)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for x in batches * 2:
                        step.step(x)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            msgs = sorted({str(w.message).splitlines()[0][:160] for w in caught})
            out[f"sync_warnings ({label}, {2 * len(batches)} steps)"] = len(caught)
            if msgs:
                out[f"sync_warning_kinds ({label})"] = msgs
        sync()
    if cuda:  # the fused step's graph replays must train as its eager steps do, bit for bit
        shape = (d_in, d_sae, k, B)
        graphed, eager = TrainStep(shape, pool[0], device, "fused"), TrainStep(shape, pool[0], device, "fused", graph=False)
        for x in pool * 3:
            graphed.step(x.to(device))
            eager.step(x.to(device))
        pairs = zip(graphed.trainer.stepper.inner.state_tensors(), eager.trainer.stepper.state_tensors())
        out[f"graph_equals_eager (fused step, {3 * len(pool)} steps, aux {AUX['aux']})"] = all(torch.equal(p, q) for p, q in pairs)
    if cuda:  # the fused step resumed from its checkpoint (bf16 moments saved as float32): bit for bit
        data = torch.cat(cpu_pool(d_in, k, B, 8, seed=7))
        cfg = config_for(d_in, d_sae, k, B, 8, device, log_every=4, checkpoint_every=4)
        with tempfile.TemporaryDirectory() as tmp:
            straight = Trainer.start(cfg, TensorSource(data), out=Path(tmp) / "a", step="fused")
            straight.fit(progress=False)
            first = Trainer.start(cfg, TensorSource(data), out=Path(tmp) / "b", step="fused")
            first.fit(until_step=4, progress=False)
            del first
            resumed = Trainer.resume(Path(tmp) / "b", TensorSource(data), cfg, step="fused")
            resumed.fit(progress=False)
            a, b = straight.state(), resumed.state()
            same = all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
            for i, moments in a["optimizer"]["state"].items():
                same &= all(torch.equal(b["optimizer"]["state"][i][key], t) for key, t in moments.items())
            out[f"resume_bit_exact (fused step, 8 steps resumed at 4, moments {straight.stepper.inner.moments['W_dec'][0].dtype})"] = same
    # the NaN/Inf guard: NaN in the data; fit must stop with one error, checkpoint intact
    data = torch.cat(cpu_pool(d_in, k, B, 40, seed=6))
    data[len(data) // 2, 3] = float("nan")
    for kind in ("autograd", "fused") if cuda else ("autograd",):
        tag = "" if kind == "autograd" else f" ({kind} step)"
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config_for(d_in, d_sae, k, B, 40, device, log_every=10, checkpoint_every=5)
            trainer = Trainer.start(cfg, TensorSource(data), out=Path(tmp) / "run", step=kind)
            try:
                trainer.fit(progress=False)
                out["nan_guard" + tag] = "NO ERROR RAISED"
            except SAEError as exc:
                out["nan_guard_error" + tag] = str(exc)
            ckpt = Path(tmp) / "run" / "checkpoint.pt"
            if ckpt.exists():
                state = torch.load(ckpt, weights_only=False)
                out["nan_guard_checkpoint_step" + tag] = int(state["step"])
                floats = [v for v in state["model"].values() if v.is_floating_point()]
                out["nan_guard_checkpoint_finite" + tag] = all(bool(torch.isfinite(v).all()) for v in floats)
            else:
                out["nan_guard_checkpoint_step" + tag] = None
    print(json.dumps(out), flush=True)
    return out


# ---- (p) where a Trainer.train_step goes (profile) -----------------------------------------
def part_p(shapes, cuda: bool) -> list[dict]:
    """Host time to issue one step (after a sync: launch + Python cost), the step's device
    time, and the profiler's per-op device times over 10 steps."""
    rows = []
    device = "cuda" if cuda else "cpu"
    for ci, shape in enumerate(shapes):
        pool = pool_for(ci, shape, 8, cuda)
        step = TrainStep(shape, pool[0], device)
        for i in range(10):
            step.step(pool[i % 8])
        host, wall = [], []
        for i in range(20):
            sync()
            t = time.perf_counter()
            step.step(pool[i % 8])
            host.append(time.perf_counter() - t)
            sync()
            wall.append(time.perf_counter() - t)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            for i in range(10):
                step.step(pool[i % 8])
            sync()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=22, max_name_column_width=60)
        except Exception:  # older spelling
            table = prof.key_averages().table(sort_by=key.replace("device", "cuda"), row_limit=22, max_name_column_width=60)
        row = {"config": "x".join(map(str, shape)), "host_ms_per_step_issue": 1e3 * sorted(host)[10], "synced_ms_per_step": 1e3 * sorted(wall)[10]}
        print(json.dumps(row), flush=True)
        print(table, flush=True)
        rows.append(row)
        del step, pool
        if cuda:
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ddp-worker":
        ddp_worker(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="c,a,b")
    ap.add_argument("--configs", default="0,1")
    ap.add_argument("--ddp-configs", default="0,1")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--ddp-check-steps", default="1,10", help="shorter runs compared 1 vs 2 processes, besides --steps")
    ap.add_argument("--ddp-batches", type=int, default=8, help="distinct batches in the data-parallel run's data")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (checks the script; numbers mean nothing)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="the trainer's --precision for every run")
    ap.add_argument("--aux", default="none", choices=("none", "auxk"), help="the trainers' aux loss (part a and c)")
    ap.add_argument("--dead-tokens", type=int, default=None, help="tokens without firing that make a feature dead (auxk)")
    args = ap.parse_args()
    global PRECISION
    PRECISION = args.precision
    AUX.update(aux=args.aux, **({"dead_tokens": args.dead_tokens} if args.dead_tokens is not None else {}))
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        import triton

        print(
            f"device: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, triton {triton.__version__}", flush=True
        )
    shapes = SMOKE_CONFIGS if args.smoke else CONFIGS
    steps = min(args.steps, 60) if args.smoke else args.steps
    parts = args.parts.split(",")
    results: dict = {}
    t0 = time.perf_counter()
    if "c" in parts:
        results["checks"] = part_c(cuda)
    if "p" in parts:
        results["profile"] = part_p([shapes[int(c)] for c in args.configs.split(",")], cuda)
    if "a" in parts:
        results["one_gpu"] = part_a([shapes[int(c)] for c in args.configs.split(",")], steps, cuda)
    if "b" in parts:
        check = [int(n) for n in args.ddp_check_steps.split(",") if n]
        results["ddp"] = part_b([shapes[int(c)] for c in args.ddp_configs.split(",")], steps, check, cuda, args.ddp_batches)
    results["wall_s"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nwall {results['wall_s']:.0f} s")
    if "one_gpu" in results:
        print("\n| config | method | tokens/s | % of encoder floor | ms/step | peak GiB | FVU after equal tokens |")
        print("|---|---|---|---|---|---|---|")
        for r in results["one_gpu"]:
            if "error" in r:
                print(f"| {r['config']} | {r['method']} | error: {r['error']} | | | | |")
                continue
            frac = f"{r['tok_per_s'] / r['floor_tok_per_s']:.1%}" if r.get("floor_tok_per_s") else "-"
            print(
                f"| {r['config']} | {r['method']} | {r['tok_per_s'] / 1e6:.3f}M | {frac} | {r['ms_per_step']:.2f} | "
                f"{r['peak_gib']:.2f} | {r['fvu']:.4f} |"
            )
    if "ddp" in results:
        print("\n| config | global batch | steps | ranks identical | rel. diff 2 GPUs vs 1 (max over tensors) "
              "| rel. diff 1 GPU vs its repeat | FVU 1 / 2 GPUs | 1 GPU tokens/s | 2 GPUs tokens/s | 2 vs 1 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in results["ddp"]:
            if "error" in r:
                print(f"| {r['config']} | {r['global_batch']} | {r['steps']} | error: {r['error'][:300]} |")
                continue
            rep = f"{max(r['rel_diff_one_repeat'].values()):.2e}" if "rel_diff_one_repeat" in r else "-"
            one, two = r.get("one_gpu_tok_per_s"), r.get("two_gpu_tok_per_s")
            speed = f"{one / 1e6:.3f}M | {two / 1e6:.3f}M | {two / one:.2f}x" if one and two else "- | - | -"
            print(
                f"| {r['config']} | {r['global_batch']} | {r['steps']} | {r['ranks_identical']} | {max(r['rel_diff_two_vs_one'].values()):.2e} | "
                f"{rep} | {r['one_gpu_fvu']:.4f} / {r['two_gpu_fvu']:.4f} | {speed} |"
            )
    if "checks" in results:
        print("\nchecks: " + json.dumps(results["checks"]))


if __name__ == "__main__":
    main()
