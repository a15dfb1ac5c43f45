"""Does sampling overlap learning? The Ray loop (as `medrl rl train` runs it) at the demo's
size, with ``rl.max_staleness=0`` (evaluate, draw and score, then train: in turn) and
``rl.max_staleness=1`` (iteration k+1 drawn and scored while the learner trains on k),
one after the other in this run, on the same generator, prompts and reward.

From each iteration's metrics record:

- ``sampling`` = ``eval_seconds`` + ``draw_seconds``: the held-out evaluation images and
  the batch, drawn by the sampler actors and scored by the reward service;
- ``learning`` = ``train_seconds``: the learner's update;
- ``seconds``: the iteration's wall time (from the previous iteration's end: also the
  checkpoint and the reporting); ``wait_seconds``: the learner idle, waiting for its batch.

Prints the medians (the first two iterations are warm-up: the overlapped loop's first
has nothing drawn ahead yet) and the ratios: the overlapped iteration's seconds against
max(sampling, learning) of the synchronous run, where each phase runs alone (target
<= 1.1; the overlapped run's own phases are slower, as they share the machine), and the
synchronous seconds against sampling + learning.

    python benchmarks/overlap.py [--config configs/demo.yaml] [--iterations 6] [key=value ...]

Without ``--generator`` a randomly initialised generator is built from ``model.*`` (time
does not depend on the weights); the reward is ``spatial`` unless overridden.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rl_iteration import PROMPTS  # noqa: E402  (benchmarks/ is on sys.path as a script)

WARMUP = 2


def _phases(records: list[dict]) -> dict[str, float]:
    """Median seconds of each phase over the timed iterations."""
    steps = [r for r in records if r.get("stage_n", 0) != 0 and "train_seconds" in r]
    timed = steps[WARMUP:]
    if not timed:
        raise SystemExit(f"no timed iteration: raise --iterations above {WARMUP}")

    def med(key: str) -> float:
        return statistics.median(float(r[key]) for r in timed)

    sampling = statistics.median(float(r["eval_seconds"] + r["draw_seconds"]) for r in timed)
    return {
        "seconds": med("seconds"),
        "sampling": sampling,
        "learning": med("train_seconds"),
        "wait": med("wait_seconds"),
        "staleness": max(float(r["staleness"]) for r in timed),
    }


def run(config: str, overrides: list[str], staleness: int) -> tuple[dict[str, float], float]:
    """One Ray run with ``rl.max_staleness=staleness``: its phase medians and wall time."""
    from cluster.driver import run_rl
    from medrl.config import load_config
    from medrl.runs import prepare_run_dir

    cfg = load_config(config, [*overrides, f"rl.max_staleness={staleness}",
                               f"run.name=overlap-{staleness}"])  # fmt: skip
    prepare_run_dir(cfg)
    t0 = time.perf_counter()
    out = run_rl(cfg)
    return _phases(out["records"]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--iterations", type=int, default=6, help=f"first {WARMUP}: warm-up")
    ap.add_argument("--generator", default=None, help="generator dir (default: a random one)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_args()
    from medrl.config import load_config

    with tempfile.TemporaryDirectory(prefix="medrl-bench-overlap-") as tmp:
        tmp = Path(tmp)
        (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        base = ["rl.reward=spatial", *args.overrides, f"rl.iterations={args.iterations}",
                f"rl.prompts_file={tmp / 'prompts.txt'}", f"run.root={tmp / 'runs'}"]  # fmt: skip
        generator = args.generator
        if generator is None:
            from generators.model import build_generator

            model = load_config(args.config, base).model
            generator = str(build_generator(model, seed=0).save(tmp / "generator"))
        base.append(f"rl.generator={generator}")
        rl = load_config(args.config, base).rl
        print(f"overlap benchmark: {rl.iterations} iterations of {rl.prompts_per_iteration} "
              f"prompts x {rl.group_size} images (+{rl.eval_prompts} x {rl.eval_per_prompt} "
              f"eval), {rl.num_samplers} samplers; {os.cpu_count()} CPUs", flush=True)  # fmt: skip
        sync, sync_wall = run(args.config, base, 0)
        ahead, ahead_wall = run(args.config, base, 1)
    print(f"\nmedian seconds per iteration (first {WARMUP} = warm-up, not counted):")
    print("               iteration  sampling  learning  learner idle")
    for name, p in (("synchronous", sync), ("draw ahead 1", ahead)):
        print(f"  {name:12s} {p['seconds']:9.2f} {p['sampling']:9.2f} {p['learning']:9.2f} "
              f"{p['wait']:13.2f}")  # fmt: skip
    print(f"wall (with start-up): synchronous {sync_wall:.1f} s, draw ahead {ahead_wall:.1f} s")
    print(f"synchronous / (sampling + learning): "
          f"{sync['seconds'] / (sync['sampling'] + sync['learning']):.3f}")  # fmt: skip
    alone = max(sync["sampling"], sync["learning"])  # each phase alone: no contention
    print(f"draw ahead / max(sampling, learning) of the synchronous run: "
          f"{ahead['seconds'] / alone:.3f} (target <= 1.1)")  # fmt: skip
    print(f"draw ahead / synchronous: {ahead['seconds'] / sync['seconds']:.3f}")


if __name__ == "__main__":
    main()
