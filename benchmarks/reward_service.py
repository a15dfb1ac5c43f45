"""Reward service throughput: batched scoring against one call per image, same run.

One RewardService actor (Ray, local, 1 CPU) holding the selector and the alignment
policy (built from ``rewards.*`` of the config, random weights: throughput does not
depend on them) scores N random images two ways, alternating so machine load hits both:

- batched: one call with all N images, scored in mini-batches of ``--batch``;
- per image: N calls of one image each, all submitted at once (Ray pipelines them, so
  this is the best case without batching; no round trip is waited on between calls).

    python benchmarks/reward_service.py [--images 256] [--size 64] [--batch 64] [--repeats 3] \
        [key.sub=value ...]

Prints images/s of both and the ratio batched / per image.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from medrl.config import load_config
from rewards.models import AlignmentPolicy, QualitySelector
from rewards.service import RewardServiceActor


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=None)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=64, help="service mini-batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, [*args.overrides, f"rewards.service_batch_size={args.batch}"])
    rcfg = cfg.rewards

    torch.manual_seed(0)
    images = torch.rand(args.images, 3, args.size, args.size) * 2 - 1
    prompts = [
        f"colour fundus photograph, {'left' if i % 2 else 'right'} eye, "
        f"{['no', 'mild', 'moderate', 'severe'][i % 4]} diabetic retinopathy"
        for i in range(args.images)
    ]
    ids = [f"img-{i}" for i in range(args.images)]
    # own storage per image: a pickled slice would carry the whole batch's storage
    singles = [images[i : i + 1].clone() for i in range(args.images)]

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "rewards"
        QualitySelector.from_config(rcfg).save_pretrained(models / "selector")
        AlignmentPolicy.from_config(rcfg).save_pretrained(models / "alignment")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            service = RewardServiceActor.options(num_cpus=1).remote(str(models), rcfg, "cpu")
            ray.get(service.ready.remote())

            def batched() -> int:
                result = ray.get(service.score.remote(images, prompts, ids))
                return len(result.scores)

            def per_image() -> int:
                refs = [
                    service.score.remote(singles[i], prompts[i : i + 1], ids[i : i + 1])
                    for i in range(args.images)
                ]
                return sum(len(r.scores) for r in ray.get(refs))

            for fn in (batched, per_image):  # warm-up (and a check that all are scored)
                if fn() != args.images:
                    raise SystemExit(f"{fn.__name__}: not every image was scored")
            times: dict[str, list[float]] = {"batched": [], "per_image": []}
            for _ in range(args.repeats):
                for name, fn in (("batched", batched), ("per_image", per_image)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        finally:
            ray.shutdown()

    ips = {k: args.images / statistics.median(v) for k, v in times.items()}
    vis = rcfg.vision
    print(
        f"reward models: ViT {vis.image_size} px, patch {vis.patch_size}, {vis.hidden_size}-d, "
        f"{vis.num_layers} layers; text {rcfg.text_encoder.hidden_size}-d, "
        f"{rcfg.text_encoder.num_layers} layers"
    )
    print(
        f"{args.images} images at {args.size} px, one RewardService actor (1 CPU), "
        f"{args.repeats} repeats (median)"
    )
    print(f"batched (mini-batch {args.batch:3d}) : {ips['batched']:8.1f} images/s")
    print(f"one call per image      : {ips['per_image']:8.1f} images/s")
    print(f"ratio batched/per-image: {ips['batched'] / ips['per_image']:.2f}")


if __name__ == "__main__":
    main()
