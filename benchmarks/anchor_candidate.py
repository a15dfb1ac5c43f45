"""medrl's sampler as a candidate for the reference kit's ``compare.py`` (issue 14).

``make_sampler(pipe_dir, config)`` loads the kit's tiny pipeline, attaches the kit's LoRA
(the same call and seed as the kit's ``plain_lora`` anchor) and returns a function that draws
one batch with :func:`generators.sampling.sample` (trajectory and per-step log-probs kept).
Run it with medrl's own venv, the kit directory and the repository on the path:

    cd ../shared/anchors && PYTHONPATH=/path/to/medrl:. python compare.py \\
        --candidate /path/to/medrl/benchmarks/anchor_candidate.py:make_sampler --reps 20
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anchor_config as ac  # the kit's module: its directory must be on sys.path

from generators.model import Generator
from generators.sampling import SampleBatch, sample


def make_sampler(pipe_dir: str, config: dict[str, Any]) -> Callable[[], SampleBatch]:
    """One batch of the kit's prompts with the kit's settings, through medrl's sampler."""
    import torch

    pipe = ac.load_plain_pipeline(pipe_dir)
    torch.manual_seed(0)
    ac.add_lora(pipe.unet)
    s = config["sampling"]
    gen = Generator(pipe=pipe, resolution=s["height"])
    prompts = list(config["prompts"])
    seeds = list(range(len(prompts)))

    def draw() -> SampleBatch:
        return sample(
            gen,
            prompts,
            seeds,
            num_steps=s["num_inference_steps"],
            eta=s["eta"],
            guidance_scale=s["guidance_scale"],
            batch_size=s["batch_size"],
        )

    return draw
