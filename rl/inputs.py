"""What an RL run starts from, and what each iteration asks for.

:func:`resolve_inputs` finds the generator, the reward and the training and evaluation
prompts (clear errors when absent); :func:`iteration_requests` and
:func:`eval_requests` are the (id, prompt, seed) of an iteration's samples and of the
fixed evaluation images: functions of (seed, iteration) only, so a resumed run draws the
same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rl.config import RLRun
from rl.samplers import SampleRequest

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs


def resolve_inputs(cfg: RLRun) -> dict[str, Any]:
    """Generator dir, reward spec, training and evaluation prompts; clear errors if absent."""
    run_dir = cfg.run_dir.resolve()
    gen_dir = Path(cfg.rl.generator) if cfg.rl.generator else run_dir / "generator"
    if not (gen_dir / "model_index.json").is_file():
        raise FileNotFoundError(
            f"rl.generator: no generator at {gen_dir} (run `medrl finetune` for this run "
            "name, or set rl.generator to a generator directory)"
        )
    if not cfg.rl.generator:
        from generators.finetune import require_merged

        require_merged(run_dir)  # RL starts from what fine-tuning learned
    reward = cfg.rl.reward or str(run_dir / "rewards")
    if reward not in ("brightness", "spatial") and not Path(reward).is_dir():
        raise FileNotFoundError(
            f"rl.reward: {reward} is not a reward-models directory (run `medrl rewards "
            "train`), nor one of: brightness, spatial"
        )
    if reward not in ("brightness", "spatial"):
        reward = str(Path(reward).resolve())
    train_prompts, eval_prompts = _prompts(cfg)
    return {
        "run_dir": str(run_dir),
        "generator_dir": str(gen_dir.resolve()),
        "reward": reward,
        "train_prompts": train_prompts,
        "eval_prompts": eval_prompts,
        "gold_reference": _gold_reference(cfg),
    }


def _gold_reference(cfg: RLRun) -> list[str]:
    """Held-out real images (val split of data.manifest) that ``fd_real`` compares against."""
    from generators.datasets import read_manifest

    manifest = Path(cfg.data.manifest_path)
    if cfg.rl.gold == "none" or not cfg.rl.gold_reference or not manifest.is_file():
        return []
    table = read_manifest(manifest)
    held_out = table[table.split != "train"]
    return [str(p) for p in (held_out if len(held_out) else table).path][: cfg.rl.gold_reference]


def _prompts(cfg: RLRun) -> tuple[list[str], list[str]]:
    from generators.datasets import read_manifest

    eval_prompts: list[str] = []
    manifest = Path(cfg.data.manifest_path)
    table = read_manifest(manifest) if manifest.is_file() else None
    if cfg.rl.prompts_file:
        path = Path(cfg.rl.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"rl.prompts_file: {path} does not exist")
        train = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not train:
            raise ValueError(f"rl.prompts_file: {path} holds no prompts")
    elif table is not None:
        train = list(dict.fromkeys(table.loc[table.split == "train", "Text"]))
    else:
        raise FileNotFoundError(
            f"no prompts: set rl.prompts_file or data.manifest ({manifest} does not exist)"
        )
    if table is not None and cfg.rl.eval_prompts:
        val = list(dict.fromkeys(table.loc[table.split != "train", "Text"]))
        eval_prompts = (val or train)[: cfg.rl.eval_prompts]
    elif cfg.rl.eval_prompts:
        eval_prompts = train[: cfg.rl.eval_prompts]
    return train, eval_prompts


def iteration_requests(
    prompts: Sequence[str], iteration: int, per_iteration: int, group: int, seed: int
) -> list[SampleRequest]:
    """The (id, prompt, seed) of iteration ``iteration``: a function of its arguments only.

    Prompts are drawn with trl's ``RepeatSampler`` (each chosen prompt repeated ``group``
    times, consecutively), seeded per iteration so a resumed run draws the same ones.
    """
    from trl.trainer.utils import RepeatSampler

    count = min(per_iteration, len(prompts))
    sampler = RepeatSampler(
        list(prompts),
        mini_repeat_count=group,
        batch_size=count,
        shuffle=True,
        seed=seed * 1_000_003 + iteration,
    )
    order = list(sampler)[: count * group]
    return [
        SampleRequest(
            sample_id=f"it{iteration:05d}-{n:04d}",
            prompt=prompts[i],
            seed=(seed * 7_919 + iteration) * 100_003 + n,
        )
        for n, i in enumerate(order)
    ]


def eval_requests(
    prompts: Sequence[str], iteration: int, first_seed: int, per_prompt: int = 1
) -> list[SampleRequest]:
    """The fixed evaluation images: ``per_prompt`` seeds per prompt, the same every version."""
    return [
        SampleRequest(f"eval{iteration:05d}-{n:03d}", p, first_seed + n)
        for n, p in enumerate(p for p in prompts for _ in range(per_prompt))
    ]
