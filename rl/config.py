"""Settings owned by the RL package (composed into the run config by medrl as ``rl``).

Defaults are the ones that learn at the demo's budget (a few iterations of a few dozen
images on a tiny model; measured in docs/rl.md, "Defaults that learn", by
benchmarks/rl_learning.py): four optimizer steps of 8 images per iteration at lr 5e-3,
one pass, leaving out the two near-deterministic last DDIM steps (``min_noise_std``),
on a LoRA that also covers the UNet's convolutions (``lora.target_modules``).
DDPO's published defaults (lr 3e-4, clip 1e-4, one update per 256 images) barely move
a tiny model in that budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from generators.config import DataConfig, LoraConfig, ModelConfig, SamplingConfig
from rewards.config import RewardsConfig
from runfiles.config import RunSection, setting


@dataclass(frozen=True)
class RLConfig:
    """The DDPO loop: samplers, rewards, the learner, checkpoints."""

    generator: str = setting(
        "", "generator directory to improve; empty: runs/<run.name>/generator (from finetune)"
    )
    reward: str = setting(
        "",
        "reward: a `medrl rewards train` output directory, `brightness` or `spatial`; "
        "empty: runs/<run.name>/rewards",
    )
    prompts_file: str = setting(
        "",
        "training prompts, one per line; empty: the train-split captions of data.manifest",
    )
    iterations: int = setting(4, "RL iterations (sample, score, update)", min=1)
    prompts_per_iteration: int = setting(4, "distinct prompts drawn per iteration", min=1)
    group_size: int = setting(
        8, "images per prompt; advantages are normalised within each prompt's group", min=2
    )
    num_samplers: int = setting(2, "sampler actors (each holds the generator)", min=1)
    sampler_num_gpus: float = setting(
        0.25, "GPU share per sampler actor where the cluster has GPUs", min=0.0, max=1.0
    )
    sampler_chunk: int = setting(
        8, "samples per sampler call (the unit redrawn after a crash)", min=1
    )
    learner_workers: int = setting(1, "Ray Train workers (DeepSpeed ranks) of the learner", min=1)
    learner_use_gpu: Literal["auto", "true", "false"] = setting(
        "auto", "learner workers on GPUs: auto = when the cluster has GPUs"
    )
    zero_stage: int = setting(2, "DeepSpeed ZeRO stage of the learner", min=0, max=3)
    deepspeed_cpu_shm: bool = setting(
        False,
        "on CPU, let DeepSpeed build its shared-memory allreduce op (a one-time C++ "
        "compile, ~45 s); off: plain gloo allreduce",
    )
    lr: float = setting(
        5e-3,
        "AdamW learning rate of the LoRA weights (2e-2 and up collapsed the tiny test model)",
        min=0.0,
    )
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0.0)
    clip_range: float = setting(0.2, "PPO ratio clip range", min=0.0)
    adv_clip: float = setting(5.0, "advantages are clipped to [-adv_clip, adv_clip]", min=0.0)
    kl_weight: float = setting(
        0.0, "weight of the KL penalty to the base model (adapter disabled); 0: off", min=0.0
    )
    grad_clip: float = setting(1.0, "gradient norm clip (0: off)", min=0.0)
    inner_epochs: int = setting(1, "passes over each iteration's samples", min=1)
    updates_per_epoch: int = setting(
        4,
        "optimizer steps per pass over an iteration's samples (each over an equal share "
        "of its micro-batches; gradients accumulate within a step)",
        min=1,
    )
    micro_batch: int = setting(
        8, "samples per learner micro-batch (per rank): the unit of shuffling", min=1
    )
    steps_per_forward: int = setting(
        2,
        "DDIM steps of a micro-batch trained in one UNet call (UNet batch = micro_batch x "
        "this, x2 with guidance): fewer, larger calls; the update is the same as one call "
        "per step up to float summation order. Memory grows with it: 1 on a GPU near its "
        "limit (configs/fundus-sd15.yaml)",
        min=1,
    )
    timestep_fraction: float = setting(
        1.0,
        "share of each trajectory's trainable DDIM steps (see min_noise_std) trained on",
        min=0.01,
        max=1.0,
    )
    min_noise_std: float = setting(
        0.05,
        "train only on DDIM steps whose noise std sigma_t is at least this: REINFORCE "
        "estimates a step's gradient from its noise, so a near-deterministic step (the "
        "last two of a Stable Diffusion schedule, sigma_t ~0.04 and ~0.02, where every "
        "other step has >= 0.1) adds variance and almost no signal (docs/rl.md); 0: all",
        min=0.0,
    )
    stage2_start: int = setting(
        2,
        "first iteration (0-based) of stage 2, which trains only on samples whose "
        "selector score passes rewards.threshold; >= iterations: stage 1 only",
        min=0,
    )
    eval_prompts: int = setting(
        8, "held-out prompts (val split) sampled with fixed seeds at every iteration", min=0
    )
    eval_per_prompt: int = setting(
        4, "evaluation images per held-out prompt (different fixed seeds)", min=1
    )
    eval_seed: int = setting(1234, "first seed of the evaluation images", min=0)
    gold: Literal["simulated", "none"] = setting(
        "simulated",
        "gold judge of the evaluation images beside the proxy reward (rl/gold.py): the "
        "SIMULATED expert rating from pixels (phantom-like images only), or none (on real "
        "data gold is a held-out round of expert ratings: `medrl ratings export-round`)",
    )
    select_by: Literal["gold", "proxy"] = setting(
        "gold",
        "held-out score that picks rl/best (the best adapter version): gold_combined "
        "when a gold judge runs, else the proxy eval_reward",
    )
    max_fd_increase: float = setting(
        0.25,
        "rl/best skips adapter versions whose fd_real (FID to held-out real images) exceeds "
        "version 0's by more than this share: they drew away from the real images",
        min=0.0,
    )
    gold_reference: int = setting(
        64, "held-out real images (val split) that fd_real compares against", min=0
    )
    max_staleness: int = setting(
        0,
        "draw ahead: the batch of iteration k is drawn with adapter version k - this "
        "(at least 0) while the learner trains on earlier ones, so sampling overlaps "
        "learning; each sample keeps the log-probs of the version that drew it (the PPO "
        "ratio corrects for the lag); 0: draw, score, train in turn",
        min=0,
    )
    checkpoint_every: int = setting(1, "iterations between checkpoints", min=1)
    keep_checkpoints: int = setting(
        2, "checkpoints kept (older ones deleted after a commit)", min=1
    )
    algorithm: Literal["ddpo", "filter_retrain", "dpo", "feature_align"] = setting(
        "ddpo",
        'how the learner learns from the rewarded samples (docs/rl.md, "Learners"): ddpo '
        "(policy gradient), filter_retrain (supervised fine-tuning on the samples that pass "
        "the reward's gate, mixed with real pairs), dpo (Diffusion-DPO on preference pairs), "
        "feature_align (filter_retrain plus Feature-Aligned Diffusion's alignment of the "
        "UNet's down-block features to the selector's)",
    )
    real_share: float = setting(
        0.25,
        "filter_retrain, feature_align: share of each supervised micro-batch drawn from the "
        "real image-text pairs of data.manifest (train split); 0: only kept samples",
        min=0.0,
        max=1.0,
    )
    dpo_beta: float = setting(
        200.0,
        "dpo: beta of the Diffusion-DPO loss (larger: a sharper preference, a tighter "
        "hold to the adapter-disabled reference); 200 raised the held-out reward twice as "
        'much as 2000 on the tests\' generator (docs/rl.md, "Learners")',
        min=0.0,
    )
    denoise_states: Literal["trajectory", "forward"] = setting(
        "trajectory",
        "filter_retrain, dpo: the states of a drawn sample their denoising loss is taken at: "
        "trajectory = those its DDIM trajectory visited (target: the noise relating each to "
        "its final latent); forward = its final latent noised afresh at a timestep of the "
        'whole training schedule, as medrl finetune does (docs/rl.md, "Learners")',
    )
    dpo_pairs: Literal["rewards", "ratings"] = setting(
        "rewards",
        "dpo: where preference pairs come from: rewards = each iteration's samples, paired "
        "within a prompt's group by reward; ratings = the expert ratings store "
        "(rewards.ratings_db: same prompt, different ratings)",
    )
    align_weight: float = setting(
        1.0,
        "feature_align: weight of the alignment term -cos(W_p f_selector(x_t), "
        "pool(f_down(x_t))) added to the supervised loss (the paper's w2)",
        min=0.0,
    )
    align_expert: str = setting(
        "",
        "feature_align: the expert whose features the UNet aligns to: a selector checkpoint "
        "directory, or a reward-models directory holding selector/; empty: rl.reward's",
    )
    max_empty_iterations: int = setting(
        3,
        "stop with an error after this many iterations in a row that trained on nothing "
        "(every reward failed, or none passed stage 2); 0: never stop",
        min=0,
    )
    sampler_max_restarts: int = setting(
        3, "restarts of a sampler actor that dies; its unfinished samples are redrawn", min=0
    )
    max_failures: int = setting(
        2,
        "restarts of the learner's Ray Train worker group after a failure; each resumes "
        "from the latest checkpoint; 0: none (a `medrl tune` trial's retries: tune.max_failures)",
        min=0,
    )
    ray_address: str = setting(
        "", "Ray cluster to join (`auto` inside a job); empty: start a local Ray on 127.0.0.1"
    )

    def __post_init__(self) -> None:
        if self.micro_batch > self.prompts_per_iteration * self.group_size:
            raise ValueError(
                f"rl.micro_batch ({self.micro_batch}) is larger than the samples of one "
                f"iteration ({self.prompts_per_iteration} x {self.group_size})"
            )


@dataclass(frozen=True)
class TuneConfig:
    """``medrl tune``: a Ray Tune search over the RL loop (one RL run per trial)."""

    num_samples: int = setting(8, "trials drawn from the search space", min=1)
    metric: str = setting(
        "eval_reward", "what trials are compared on: a key of the RL iteration's metrics"
    )
    mode: Literal["max", "min"] = setting("max", "whether a larger or a smaller metric is better")
    scheduler: Literal["asha", "fifo"] = setting(
        "asha", "ASHA stops weak trials early (by iteration); fifo runs every trial to the end"
    )
    grace_period: int = setting(
        1, "ASHA: iterations every trial gets before it can be stopped", min=1
    )
    reduction_factor: int = setting(2, "ASHA: keep the best 1/reduction_factor at each rung", min=2)
    max_concurrent: int = setting(
        1, "trials at once (each starts its own samplers, reward service and learner)", min=1
    )
    seed: int = setting(0, "seed of the search (which points are drawn)", min=0)
    max_failures: int = setting(
        1,
        "retries of a trial that failed, under its run name (it resumes from its latest "
        "checkpoint); each try restarts its learner up to rl.max_failures times of its own, "
        "so a learner that always fails runs (tune.max_failures + 1) x (rl.max_failures + 1) "
        "times; 0: none",
        min=0,
    )
    space: tuple[str, ...] = setting(
        (
            "rl.lr=loguniform(1e-3, 2e-2)",
            "rl.clip_range=uniform(0.05, 0.5)",
            "rl.adv_clip=choice(2.0, 5.0, 10.0)",
            "rl.group_size=choice(4, 8)",
            "rl.kl_weight=choice(0.0, 0.01, 0.1)",
            "rewards.threshold=uniform(0.1, 0.5)",
            "rewards.quality_weight=uniform(0.2, 0.8)",
        ),
        "search space, one `key=distribution(args)` per entry; distributions: uniform, "
        "loguniform, randint (high exclusive), choice; keys are dotted config keys",
    )
    out: str = setting("", "where results.csv and best.yaml go; empty: runs/<run.name>/tune")


class RLRun(Protocol):
    """The sections of a run's config that the RL loop, its driver and Tune read: medrl's
    composed ``RunConfig`` has them (rl does not import medrl, so it states what it needs
    here instead of taking the whole config as ``Any``)."""

    run: RunSection
    data: DataConfig
    model: ModelConfig
    lora: LoraConfig
    sampling: SamplingConfig
    rewards: RewardsConfig
    rl: RLConfig

    @property
    def run_dir(self) -> Path: ...
