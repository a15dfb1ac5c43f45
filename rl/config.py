"""Settings owned by the RL package (composed into the run config by medrl as ``rl``).

Defaults are the ones that learn at the demo's budget (a few iterations of a few dozen
images on the tiny 64 px model, see docs/rl.md): DDPO's published defaults (lr 3e-4,
clip 1e-4, one update per 256 images) barely move a tiny model in that budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


def _f(default, help: str, **meta):  # noqa: A002 - mirrors dataclasses.field's metadata
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class RLConfig:
    """The DDPO loop: samplers, rewards, the learner, checkpoints."""

    generator: str = _f(
        "", "generator directory to improve; empty: runs/<run.name>/generator (from finetune)"
    )
    reward: str = _f(
        "",
        "reward: a `medrl rewards train` output directory, `brightness` or `spatial`; "
        "empty: runs/<run.name>/rewards",
    )
    prompts_file: str = _f(
        "",
        "training prompts, one per line; empty: the train-split captions of data.manifest",
    )
    iterations: int = _f(4, "RL iterations (sample, score, update)", min=1)
    prompts_per_iteration: int = _f(4, "distinct prompts drawn per iteration", min=1)
    group_size: int = _f(
        8, "images per prompt; advantages are normalised within each prompt's group", min=2
    )
    num_samplers: int = _f(2, "sampler actors (each holds the generator)", min=1)
    sampler_num_gpus: float = _f(
        0.25, "GPU share per sampler actor where the cluster has GPUs", min=0.0, max=1.0
    )
    sampler_chunk: int = _f(8, "samples per sampler call (the unit redrawn after a crash)", min=1)
    learner_workers: int = _f(1, "Ray Train workers (DeepSpeed ranks) of the learner", min=1)
    learner_use_gpu: Literal["auto", "true", "false"] = _f(
        "auto", "learner workers on GPUs: auto = when the cluster has GPUs"
    )
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage of the learner", min=0, max=3)
    deepspeed_cpu_shm: bool = _f(
        False,
        "on CPU, let DeepSpeed build its shared-memory allreduce op (a one-time C++ "
        "compile, ~45 s); off: plain gloo allreduce",
    )
    lr: float = _f(3e-3, "AdamW learning rate of the LoRA weights", min=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0.0)
    clip_range: float = _f(0.2, "PPO ratio clip range", min=0.0)
    adv_clip: float = _f(5.0, "advantages are clipped to [-adv_clip, adv_clip]", min=0.0)
    kl_weight: float = _f(
        0.0, "weight of the KL penalty to the base model (adapter disabled); 0: off", min=0.0
    )
    grad_clip: float = _f(1.0, "gradient norm clip (0: off)", min=0.0)
    inner_epochs: int = _f(2, "passes over each iteration's samples", min=1)
    updates_per_epoch: int = _f(
        1, "optimizer steps per pass over an iteration's samples (gradients accumulate)", min=1
    )
    micro_batch: int = _f(8, "samples per learner forward pass (per rank)", min=1)
    timestep_fraction: float = _f(
        1.0, "share of each trajectory's DDIM steps trained on", min=0.01, max=1.0
    )
    stage2_start: int = _f(
        2,
        "first iteration (0-based) of stage 2, which trains only on samples whose "
        "selector score passes rewards.threshold; >= iterations: stage 1 only",
        min=0,
    )
    eval_prompts: int = _f(
        8, "held-out prompts (val split) sampled with fixed seeds at every iteration", min=0
    )
    eval_seed: int = _f(1234, "first seed of the evaluation images", min=0)
    checkpoint_every: int = _f(1, "iterations between checkpoints", min=1)
    keep_checkpoints: int = _f(2, "checkpoints kept (older ones deleted after a commit)", min=1)
    sampler_max_restarts: int = _f(
        3, "restarts of a sampler actor that dies; its unfinished samples are redrawn", min=0
    )
    ray_address: str = _f(
        "", "Ray cluster to join (`auto` inside a job); empty: start a local Ray on 127.0.0.1"
    )

    def __post_init__(self) -> None:
        if self.micro_batch > self.prompts_per_iteration * self.group_size:
            raise ValueError(
                f"rl.micro_batch ({self.micro_batch}) is larger than the samples of one "
                f"iteration ({self.prompts_per_iteration} x {self.group_size})"
            )
