"""What every part of the GPU check shares: the log line, the device's description, the benchmark table,
the step mode and schedule it picks, and one phase trained through fmvae.core.phases (the same phase
functions `dvc repro` and the sweep train with) with an eager fallback."""
from __future__ import annotations

import dataclasses
import platform
import time
import traceback
from pathlib import Path

import torch

from fmvae.core.pipeline import write_curve
from fmvae.io import atomic_write_json, atomic_write_text
from fmvae.params import Params, TrainConfig, train_config
from fmvae.tools import bench


PRESET = Path(__file__).resolve().parents[3] / "presets" / "mnist_paper.yaml"


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env |= {"gpu": p.name, "gpu_memory_gb": round(p.total_memory / 2 ** 30, 1), "sm_count": p.multi_processor_count,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    else:
        env["gpu"] = "none (CPU)"
    return env


def run_bench(args, device, out: Path, compile_bf16: bool = False) -> list[dict]:
    """bench's table: eager and graph with bf16 off and on; compiled (at K = 512) in float32 only
    unless asked, since every compiled configuration costs its own compilation."""
    b = bench.parser().parse_args([])
    b.device, b.tiny = str(device), args.tiny
    b.modes = ["eager", "graph"]
    b.bf16 = ["off", "on"] if device.type == "cuda" else ["off"]
    b.iters, b.repeats, b.warmup, b.celeba_iters = 50, 5, 10, 10
    b.eval_points, b.iw_samples = 10000, 100
    if args.tiny:
        b.mnist_K, b.no_celeba, b.bf16 = [2, 16], True, ["off"]
    rows = bench.run(b)
    if not args.no_compile and not args.tiny:
        c = bench.parser().parse_args([])
        vars(c).update(vars(b))
        c.modes, c.mnist_K, c.no_celeba = ["compiled"], [max(b.mnist_K)], True
        c.bf16 = ["off", "on"] if compile_bf16 else ["off"]
        rows += bench.run(c)
    atomic_write_json(out / "bench.json", rows)
    atomic_write_text(out / "bench.txt", bench.format_table(rows) + "\n")
    print(bench.format_table(rows), flush=True)
    return rows


def float32_mnist(rows: list[dict]) -> list[dict]:
    """The benchmark rows a training run can follow: the 28x28 model in float32, timed without error."""
    return [r for r in rows if r["model"] == "mnist28" and not r["bf16"] and "error" not in r]


def fastest_mode(rows: list[dict], device) -> str:
    """The mode with the most joint it/s at the largest K in float32 (bf16 changes the numbers)."""
    mnist = float32_mnist(rows)
    if not mnist:
        return "graph" if device.type == "cuda" else "eager"
    k = max(r["K"] for r in mnist)
    return max((r for r in mnist if r["K"] == k), key=lambda r: r["joint_it_s"])["mode"]


def schedule(params: Params, rates: dict, budget_s: float) -> tuple[dict, float]:
    """Iterations per phase: the preset's, scaled down by one factor if their predicted time exceeds budget_s."""
    full = {p: getattr(params, p).iters for p in ("pretrain", "prior_init", "joint")}
    predicted = sum(n / rates[p] for p, n in full.items())
    scale = min(1.0, budget_s / predicted)
    return {p: max(1, int(n * scale)) for p, n in full.items()}, scale


def phase_config(params: Params, phase: str, flags: dict, **changes) -> TrainConfig:
    """The phase's TrainConfig as `dvc repro` and the sweep build it (fmvae.params.train_config), in the step
    mode `flags` (fmvae.tools.bench.MODES), without a progress bar or timed checkpoints (the check keeps
    none to resume), with `changes` on top."""
    return dataclasses.replace(train_config(params, phase), progress=False, checkpoint_every_s=1e9, **flags, **changes)


def train_phase(name, fn, model, data, cfg, out: Path) -> tuple[list[dict], dict]:
    """One phase in the chosen mode; if that mode fails, the phase is rerun eagerly from the same start."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    info = {"mode": "compiled" if cfg.compile else ("graph" if cfg.cuda_graph else "eager"), "iters": cfg.iters}
    try:
        history = fn(model, data, cfg)
    except Exception as err:  # a capture or compile failure must not cost the whole check
        info["error"] = f"{type(err).__name__}: {err}"
        log(f"{name}: {info['mode']} failed ({info['error'][:300]}); rerunning eagerly")
        traceback.print_exc()
        model.load_state_dict(before)
        cfg = dataclasses.replace(cfg, compile=False, cuda_graph=False)
        info["mode"] = "eager (fallback)"
        start = time.perf_counter()
        history = fn(model, data, cfg)
    if data.x.is_cuda:
        torch.cuda.synchronize()
    info["wall_s"] = time.perf_counter() - start
    info["it_s"] = cfg.iters / info["wall_s"]
    write_curve(history, out / f"curve_{name}.csv")
    log(f"{name}: {cfg.iters} iterations in {info['wall_s']:.1f} s ({info['it_s']:.0f} it/s, {info['mode']})")
    return history, info
