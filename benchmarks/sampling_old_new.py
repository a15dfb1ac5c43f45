"""Two versions of medrl's sampler and the kit's plain pipeline, interleaved in one process.

    PYTHONPATH=$REPO python benchmarks/sampling_old_new.py OLD/generators/sampling.py \\
        [--kit ../shared/anchors] [--reps 20]

"old" is the given ``generators/sampling.py`` (e.g. main's checkout), "new" this checkout's;
both run on one generator built from the kit's tiny pipeline with the kit's LoRA, against
``StableDiffusionPipeline.__call__`` with the same LoRA, in rotating order. It first checks
that old and new give bit-identical latents, log-probs and images, then prints every rep and
the paired medians of the images/s ratios.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("old")
    ap.add_argument("--kit", default="../shared/anchors")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, args.kit)
    import anchor_config as ac
    import torch

    from generators.model import Generator
    from generators.sampling import sample as new_sample

    torch.set_num_threads(ac.THREADS)
    spec = importlib.util.spec_from_file_location("old_sampling", args.old)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_sampling"] = old
    spec.loader.exec_module(old)
    path = ac.ensure_pipeline()
    pipe, cand = ac.load_plain_pipeline(path), ac.load_plain_pipeline(path)
    for p in (pipe, cand):
        torch.manual_seed(0)
        ac.add_lora(p.unet)
    gen, prompts, seeds = Generator(pipe=cand, resolution=64), ac.PROMPTS, list(range(8))
    g = torch.Generator().manual_seed(0)
    fns = {
        "plain": lambda: pipe(
            prompt=prompts,
            num_inference_steps=10,
            guidance_scale=5.0,
            eta=1.0,
            output_type="pt",
            generator=g,
        ),  # fmt: skip
        "old": lambda: old.sample(gen, prompts, seeds, 10, 1.0, 5.0, 8),
        "new": lambda: new_sample(gen, prompts, seeds, 10, 1.0, 5.0, 8),
    }
    a, b = fns["old"](), fns["new"]()
    same = all(
        torch.equal(getattr(a, k), getattr(b, k)) for k in ("latents", "log_probs", "images")
    )
    print("old and new bit-identical:", same, flush=True)
    fns["plain"]()
    t: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(args.reps):
        for k in names[r % 3 :] + names[: r % 3]:
            gc.collect()
            t0 = time.perf_counter()
            fns[k]()
            t[k].append(time.perf_counter() - t0)
        print(r, {k: round(v[-1], 3) for k, v in t.items()}, flush=True)

    def paired(x: str, y: str) -> float:  # images/s of y over x's, rep by rep
        return statistics.median(tx / ty for tx, ty in zip(t[x], t[y], strict=True))

    print("medians s:", {k: round(statistics.median(v), 4) for k, v in t.items()})
    print(
        f"paired median images/s ratio old/plain {paired('plain', 'old'):.4f} "
        f"new/plain {paired('plain', 'new'):.4f} new/old {paired('old', 'new'):.4f}"
    )


if __name__ == "__main__":
    main()
