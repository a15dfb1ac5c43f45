"""How sampling and learning cost grow with batch, DDIM steps and resolution.

From the demo's model (configs/demo.yaml), one setting changed at a time, three values
each (the middle one is the demo's): the sampler's time for one batch (trajectories with
per-step log-probs: ``rl.samplers.Sampler.sample``) and the learner's time for one update
over it (``rl.learner.Learner.train``: every trainable DDIM step of every sample, one
optimizer step). Each is the median of ``--repeats`` timed calls after one warm-up, in this
process, one torch thread per ``--threads``. Printed per setting: seconds, and the growth
against the smallest value next to the growth of the work (images x steps x pixels), so a
line that grows faster than its work says where the overhead is.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py [--repeats 3] [--threads 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SWEEPS = {  # name -> (config key, values); the middle value is the demo's
    "batch": ("sampling.batch_size", [4, 8, 16]),
    "steps": ("sampling.num_steps", [5, 10, 20]),
    "resolution": ("model.resolution", [32, 64, 128]),
}
PROMPT = "colour fundus photograph, {} eye, moderate diabetic retinopathy"


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(config: str, overrides: list[str], tmp: Path, repeats: int) -> tuple[float, float]:
    """Seconds of one sampler batch and of one learner update over it."""
    from generators.model import build_generator
    from medrl.config import load_config
    from rl.learner import Learner
    from rl.samplers import Sampler, SampleRequest

    cfg = load_config(config, overrides)
    n = cfg.sampling.batch_size
    cfg = load_config(config, [*overrides, f"rl.micro_batch={n}", "rl.updates_per_epoch=1",
                               "rl.inner_epochs=1", f"rl.prompts_per_iteration={n}"])  # fmt: skip
    gen_dir = build_generator(cfg.model, seed=0).save(tmp / f"gen-{cfg.model.resolution}")
    sampler = Sampler(str(gen_dir), cfg.lora, cfg.sampling, device="cpu")
    learner = Learner(gen_dir, cfg.lora, cfg.sampling, cfg.rl)
    adapter = learner.adapter_state()
    requests = [SampleRequest(f"s{i}", PROMPT.format("left" if i % 2 else "right"), i)
                for i in range(n)]  # fmt: skip
    box = {}

    def draw() -> None:
        box["traj"] = sampler.sample(requests, 0, [adapter])

    sample_s = _median_time(draw, repeats)
    adv = torch.linspace(-1.0, 1.0, n)
    batch = box["traj"].for_learner(adv, keep=list(range(n)))
    iteration = iter(range(10**6))
    train_s = _median_time(lambda: learner.train(batch, next(iteration), 0), repeats)
    return sample_s, train_s


def work(name: str, value: int, base: int) -> float:
    """How much more work than the smallest value (pixels grow with the square)."""
    return (value / base) ** 2 if name == "resolution" else value / base


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated sweeps (batch,steps,resolution)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [s for s in args.only.split(",") if s] or list(SWEEPS)
    print(f"scaling: demo model, one setting at a time; median of {args.repeats} calls, "
          f"{args.threads} thread(s), {os.cpu_count()} CPUs", flush=True)  # fmt: skip
    print(f"{'setting':>24s} {'sample s':>9s} {'growth':>7s} {'learn s':>8s} {'growth':>7s} "
          f"{'work':>6s}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="medrl-bench-scaling-") as tmp:
        for name in names:
            key, values = SWEEPS[name]
            first = None
            for value in values:
                s, t = measure(args.config, [*args.overrides, f"{key}={value}"], Path(tmp),
                               args.repeats)  # fmt: skip
                first = first or (s, t)
                print(f"{key + '=' + str(value):>24s} {s:9.3f} {s / first[0]:7.2f} {t:8.3f} "
                      f"{t / first[1]:7.2f} {work(name, value, values[0]):6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
