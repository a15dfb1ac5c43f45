"""``medrl rl train``: the DDPO loop on Ray (see DESIGN.md, "The RL iteration").

The driver starts the sampler actors and the reward service, then a Ray Train
``TorchTrainer`` whose workers each hold a :class:`rl.learner.Learner` (DeepSpeed over
the UNet, LoRA only). Rank 0 of the trainer runs the iteration:

1. the adapter of version k (k updates so far) goes into the object store once;
2. held-out evaluation prompts are drawn with fixed seeds and scored (version k);
3. the samplers draw ``group_size`` images for each of ``prompts_per_iteration``
   prompts, seeds derived from (run seed, k), each sample with an id;
4. the reward service scores them; rewards join samples by id;
5. advantages are normalised per prompt; stage 2 keeps the samples that pass;
6. every rank trains on its shard (gradients synchronised by DeepSpeed);
7. a checkpoint is committed (temporary directory, rename, then the ``latest``
   pointer), metrics go to stdout, TensorBoard, Ray metrics and metrics.jsonl.

Everything an iteration draws is a function of (seed, k) and the adapter, so a rerun
with the same run name resumes from the latest checkpoint and ends with the same adapter
as an uninterrupted run. The same :func:`run_iterations` runs without Ray
(:class:`LocalBackend`) for the single-process baseline of benchmarks/rl_iteration.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rl.gold import GoldJudge, make_gold_judge, selection_score, standard_error
from rl.learner import Learner, TrainBatch, group_advantages, load_rng_state, save_rng_state
from rl.samplers import SampleRequest, Trajectories
from runfiles import (
    METRICS_FILE,
    append_metrics,
    atomic_write_text,
    commit_folder,
    prune_checkpoints,
    read_latest,
    read_metrics,
    write_latest,
)
from runfiles.config import to_dict

# ``cfg`` below is medrl's composed RunConfig (``run``, ``data``, ``lora``, ``sampling``,
# ``rewards``, ``rl`` sections); rl does not import medrl (DESIGN.md: dependencies point one
# way), so it is typed ``Any`` here and reaches the Ray Train workers as the object itself.

log = logging.getLogger(__name__)

RL_DIR = "rl"
#: ``runs/<name>/rl/best``: the adapter version with the best held-out score (rl.select_by)
BEST_DIR = "best"
#: ``runs/<name>/rl/eval/version-NNNN.png``: the evaluation images of each adapter version
EVAL_DIR = "eval"


# --------------------------------------------------------------------------- inputs


def resolve_inputs(cfg: Any) -> dict[str, Any]:
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


def _gold_reference(cfg: Any) -> list[str]:
    """Held-out real images (val split of data.manifest) that ``fd_real`` compares against."""
    from generators.datasets import read_manifest

    manifest = Path(cfg.data.manifest_path)
    if cfg.rl.gold == "none" or not cfg.rl.gold_reference or not manifest.is_file():
        return []
    table = read_manifest(manifest)
    held_out = table[table.split != "train"]
    return [str(p) for p in (held_out if len(held_out) else table).path][: cfg.rl.gold_reference]


def _prompts(cfg: Any) -> tuple[list[str], list[str]]:
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


# --------------------------------------------------------------------------- backends


class Backend(Protocol):
    """Where samples are drawn and scored: Ray actors, or this process."""

    def draw(
        self, requests: Sequence[SampleRequest], version: int, adapter: dict[str, torch.Tensor]
    ) -> Trajectories: ...

    def score(self, traj: Trajectories) -> Any: ...


class RayBackend:
    """Sampler actors and reward-service actors, by handle."""

    def __init__(self, samplers: Sequence[Any], rewards: Sequence[Any], chunk: int):
        self.samplers, self.rewards, self.chunk = list(samplers), list(rewards), chunk
        self._version, self._ref = None, None

    def draw(self, requests, version, adapter):
        import ray

        from rl.samplers import draw_samples

        if version != self._version:  # one ray.put per adapter version
            self._ref, self._version = ray.put(adapter), version
        traj, _ = draw_samples(self.samplers, requests, version, self._ref, self.chunk)
        return traj

    def score(self, traj):
        from rewards.service import score_with_services

        return score_with_services(
            self.rewards, traj.images, traj.prompts, traj.ids, batch_size=self.chunk
        )


class LocalBackend:
    """One in-process sampler and reward: the single-process reference."""

    def __init__(self, sampler: Any, reward: Any):
        self.sampler, self.reward = sampler, reward

    def draw(self, requests, version, adapter):
        return self.sampler.sample(list(requests), version, [adapter])

    def score(self, traj):
        return self.reward.score(traj.images, traj.prompts, traj.ids)


def run_local(
    cfg: Any,
    inputs: dict[str, Any],
    reward: Any = None,
    learner_seed: int = 0,
    device: str = "cpu",
) -> tuple[list[dict[str, Any]], Learner]:
    """The loop in one process, no Ray: one :class:`Sampler`, the reward, one learner.

    ``inputs`` as from :func:`resolve_inputs` (``run_dir``, ``generator_dir``, the
    prompts; ``reward`` unless a ``reward`` object is given). The single-process
    reference of benchmarks/rl_iteration.py, and what the learning tests and
    benchmarks/rl_learning.py run. Returns the records and the learner.
    """
    from rewards.scorers import build_reward
    from rl.samplers import Sampler

    if reward is None:
        reward = build_reward(inputs["reward"], cfg.rewards)
    gen_dir = inputs["generator_dir"]
    sampler = Sampler(str(gen_dir), cfg.lora, cfg.sampling, device=device)
    learner = Learner(gen_dir, cfg.lora, cfg.sampling, cfg.rl, device=device, seed=learner_seed)
    Path(inputs["run_dir"]).mkdir(parents=True, exist_ok=True)
    records = run_iterations(cfg, inputs, learner, LocalBackend(sampler, reward), use_ray=False)
    return records, learner


# --------------------------------------------------------------------------- checkpoints


def latest_rl_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint ``ckpt_root/latest`` names (validated: runfiles.read_latest)."""
    return read_latest(ckpt_root)


def _broadcast(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def commit_rl_checkpoint(
    learner: Learner, ckpt_root: Path, done: int, state: dict[str, Any], keep: int
) -> Path:
    """Collective. Every rank writes its engine state into a temporary directory; rank 0
    adds adapter, state and RNG, commits it into place (runfiles), then writes ``latest``, then
    deletes checkpoints beyond ``keep`` (oldest first)."""
    import torch.distributed as dist

    from generators.lora import save_adapter

    name = f"step-{done:06d}"
    final = ckpt_root / name
    tmp = None
    if learner.rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=ckpt_root, prefix=f".{name}.")
    tmp = Path(_broadcast(tmp))
    try:
        learner.save(tmp)
        dist.barrier()
        with learner.gathered():  # collective under ZeRO-3: every rank enters, rank 0 writes
            if learner.rank == 0:
                save_adapter(learner.engine.module, tmp / "adapter", formats=("diffusers",))
        if learner.rank == 0:
            save_rng_state(tmp / "rng.json")
            (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
            commit_folder(tmp, final)
            write_latest(ckpt_root, name)
    except BaseException:
        if learner.rank == 0:  # a failed save leaves no temporary folder behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if learner.rank == 0:
        prune_checkpoints(ckpt_root, keep)
    dist.barrier()
    return final


class BestAdapter:
    """``rl/best``: the adapter version whose held-out score is the best so far.

    The score is ``gold_combined`` (``rl.select_by=gold`` and a gold judge) or the proxy
    ``eval_reward``; ties keep the earlier version. A version whose ``fd_real`` exceeds
    version 0's by more than ``max_fd_increase`` (it drew away from the real images) is
    not eligible. The version, score and version 0's ``fd_real`` are in its
    ``adapter_config.json``, which a resumed run reads back, so the choice spans
    invocations.
    """

    def __init__(self, out: Path, select_by: str, peft_config: Any, max_fd_increase: float):
        self.out, self.select_by, self.peft_config = Path(out), select_by, peft_config
        self.max_fd_increase = float(max_fd_increase)
        self.score, self.version, self.base_fd = -math.inf, None, None
        meta = self.out / "adapter_config.json"
        if meta.is_file():
            saved = json.loads(meta.read_text())
            self.score, self.version = float(saved["score"]), int(saved["version"])
            self.base_fd = saved.get("base_fd_real")

    def eligible(self, record: dict[str, Any]) -> bool:
        fd = record.get("fd_real")
        if not finite(fd) or not finite(self.base_fd) or self.base_fd <= 0:
            return True
        return fd <= self.base_fd * (1.0 + self.max_fd_increase)

    def offer(self, version: int, record: dict[str, Any], adapter: dict[str, torch.Tensor]):
        from generators.lora import save_adapter_state

        if version == 0 and finite(record.get("fd_real")):
            self.base_fd = float(record["fd_real"])
        score = selection_score(record, self.select_by)
        if not math.isfinite(score) or score <= self.score or not self.eligible(record):
            return
        selected_by = "gold_combined" if "gold_combined" in record and (
            self.select_by == "gold") else "eval_reward"  # fmt: skip
        extra = {
            "version": version,
            "score": score,
            "selected_by": selected_by,
            "base_fd_real": self.base_fd,
        }
        save_adapter_state(adapter, self.peft_config, self.out, extra=extra)
        self.score, self.version = score, version


# --------------------------------------------------------------------------- the loop


@dataclass
class IterationLog:
    """Where rank 0 reports: stdout, TensorBoard, Ray metrics, metrics.jsonl."""

    run_dir: Path
    run_name: str
    use_ray_metrics: bool

    def __post_init__(self):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tb" / "rl"))
        self.gauges: dict[str, Any] = {}

    def _gauge(self, key: str, value: float) -> None:
        if not self.use_ray_metrics or not math.isfinite(value):
            return
        from ray.util.metrics import Gauge

        name = "medrl_rl_" + "".join(c if c.isalnum() else "_" for c in key)
        if name not in self.gauges:
            self.gauges[name] = Gauge(name, description=f"medrl RL: {key}", tag_keys=("run",))
        self.gauges[name].set(value, tags={"run": self.run_name})

    def write(self, record: dict[str, Any], eval_images: torch.Tensor | None) -> None:
        it = record["iteration"]
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "iteration":
                self.writer.add_scalar(f"rl/{k}", v, it)
                self._gauge(k, float(v))
        if eval_images is not None and len(eval_images):
            from generators.images import make_grid, save_png, to_uint8

            grid = make_grid(list(to_uint8(eval_images)), ncols=min(8, len(eval_images)))
            self.writer.add_image("rl/eval_images", grid, it, dataformats="HWC")
            save_png(grid, self.run_dir / RL_DIR / EVAL_DIR / f"version-{it:04d}.png")
        self.writer.flush()
        append_metrics(self.run_dir / METRICS_FILE, [{"stage": "rl", **record}])
        keys = [
            "reward_mean",
            "reward_std",
            "eval_reward",
            "gold_combined",
            "gold_quality",
            "gold_faithfulness",
            "gold_eye_match",
            "fd_real",
            "pass_rate",
            "approx_kl",
            "clipfrac",
            "samples_per_s",
        ]
        shown = " ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)
        where = f"stage {record['stage_n']}" if record.get("stage_n") else "final adapter"
        print(f"[rl] iteration {it} {where}: {shown}", flush=True)

    def close(self) -> None:
        self.writer.close()


def _score_map(traj: Trajectories, result: Any) -> tuple[list[int], torch.Tensor, list[bool]]:
    """Join scores to samples by id; rows with an error are dropped (and logged)."""
    rows, rewards, passed = [], [], []
    for i, sid in enumerate(traj.ids):
        if sid in result.errors:
            log.warning("reward error for %s: %s (sample dropped)", sid, result.errors[sid])
            continue
        s = result.scores[sid]
        rows.append(i)
        rewards.append(float(s.reward))
        passed.append(bool(s.passed))
    return rows, torch.tensor(rewards, dtype=torch.float32), passed


def evaluate_adapter(
    backend: Backend,
    prompts: Sequence[str],
    iteration: int,
    version: int,
    adapter,
    rl: Any,
    gold: GoldJudge | None = None,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Proxy and gold of the fixed evaluation images under adapter ``version``.

    Returns the record keys (``eval_reward`` and its standard error ``eval_reward_se``,
    plus the gold judge's keys, rl/gold.py) and the images.
    """
    if not prompts:
        return {"eval_reward": float("nan")}, None
    requests = eval_requests(prompts, iteration, rl.eval_seed, rl.eval_per_prompt)
    traj = backend.draw(requests, version, adapter)
    rows, rewards, _ = _score_map(traj, backend.score(traj))
    out = {
        "eval_reward": float(rewards.mean()) if rows else float("nan"),
        "eval_reward_se": standard_error(rewards.tolist()),
    }
    if gold is not None:
        out.update(gold.judge(traj.images, traj.prompts))
    return out, traj.images


def run_iterations(
    cfg: Any,
    inputs: dict[str, Any],
    learner: Learner,
    backend: Backend | None,
    use_ray: bool,
) -> list[dict[str, Any]]:
    """The iterations (every rank calls this; ``backend`` is used on rank 0 only)."""
    import torch.distributed as dist
    from tqdm import tqdm

    rl = cfg.rl
    run_dir = Path(inputs["run_dir"])
    ckpt_root = run_dir / RL_DIR / "checkpoints"
    start, records = 0, []
    latest = latest_rl_checkpoint(ckpt_root)
    if latest is not None:
        learner.load(latest)
        state = json.loads((latest / "state.json").read_text())
        start = int(state["iterations_done"])
        learner.optimizer_steps = int(state.get("optimizer_steps", 0))
        load_rng_state(latest / "rng.json")
        if learner.rank == 0:
            log.info("resuming %s after iteration %d (%s)", cfg.run.name, start - 1, latest)
    report = IterationLog(run_dir, cfg.run.name, use_ray) if learner.rank == 0 else None
    gold, best = None, None
    if learner.rank == 0:
        gold = make_gold_judge(cfg.rl.gold, inputs.get("gold_reference", []), cfg.model.resolution)
        best = BestAdapter(
            run_dir / RL_DIR / BEST_DIR,
            cfg.rl.select_by,
            learner.adapter_config(),
            cfg.rl.max_fd_increase,
        )
    initial_digest = adapter_digest(learner.adapter_state())  # collective under ZeRO-3
    trained_ids: list[str] = []
    bar = tqdm(
        range(start, rl.iterations),
        desc="RL iterations",
        disable=learner.rank != 0,
        initial=start,
        total=rl.iterations,
    )
    # an iteration's ``seconds`` runs from the previous one's mark to its own, so the
    # reporting of iteration k-1 (TensorBoard, Ray metrics, ray.train.report) is in k's
    mark = time.perf_counter()
    for k in bar:
        record: dict[str, Any] = {"iteration": k}
        stage = 2 if k >= rl.stage2_start else 1
        batch = None
        eval_images = None
        adapter = learner.adapter_state()  # on every rank: collective under ZeRO-3
        if learner.rank == 0:
            scores, eval_images = evaluate_adapter(
                backend, inputs["eval_prompts"], k, k, adapter, rl, gold
            )
            record.update(scores)
            best.offer(k, record, adapter)
            requests = iteration_requests(
                inputs["train_prompts"],
                k,
                rl.prompts_per_iteration,
                rl.group_size,
                cfg.run.seed,
            )
            t_draw = time.perf_counter()
            traj = backend.draw(requests, k, adapter)
            draw_s = time.perf_counter() - t_draw
            assert all(v == k for v in traj.versions), "a sample drew with a stale adapter"
            rows, rewards, passed = _score_map(traj, backend.score(traj))
            traj = traj.select(rows)
            adv = group_advantages(traj.prompts, rewards, rl.adv_clip)
            keep = list(range(len(traj))) if stage == 1 else [i for i, p in enumerate(passed) if p]
            batch = TrainBatch(
                ids=[traj.ids[i] for i in keep],
                prompts=[traj.prompts[i] for i in keep],
                latents=traj.latents[keep],
                log_probs=traj.log_probs[keep],
                timesteps=traj.timesteps,
                advantages=adv[keep],
            )
            record.update(
                stage_n=stage,
                reward_mean=float(rewards.mean()) if len(rewards) else float("nan"),
                reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
                pass_rate=sum(passed) / max(len(passed), 1),
                samples=len(requests),
                trained_samples=len(keep),
                samples_per_s=len(requests) / max(draw_s, 1e-9),
            )
            record[f"reward_mean_stage{stage}"] = record["reward_mean"]
            record[f"reward_std_stage{stage}"] = record["reward_std"]
        batch = _broadcast(batch)
        shard, weights = batch.shard(learner.rank, learner.world)
        trained_ids += [sid for sid, w in zip(shard.ids, weights.tolist(), strict=True) if w > 0]
        stats = learner.train(batch, k, cfg.run.seed) if len(batch) else {}
        stats = _mean_over_ranks(stats)
        done = k + 1
        if done % rl.checkpoint_every == 0 or done == rl.iterations:
            state = {
                "iterations_done": done,
                "optimizer_steps": learner.optimizer_steps,
                "adapter_version": done,
                "config": to_dict(cfg),
            }
            commit_rl_checkpoint(learner, ckpt_root, done, state, rl.keep_checkpoints)
        if learner.rank == 0:
            record.update({k2: v for k2, v in stats.items() if k2 != "updates"})
            now = time.perf_counter()
            record["seconds"], mark = now - mark, now
            report.write(record, eval_images)
            records.append(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
        if use_ray:
            import ray.train

            ray.train.report({k2: v for k2, v in record.items() if _num(v)})
    adapter = learner.adapter_state()
    if learner.rank == 0:
        final = {"iteration": rl.iterations, "stage_n": 0}
        scores, images = evaluate_adapter(
            backend, inputs["eval_prompts"], rl.iterations, rl.iterations, adapter, rl, gold
        )
        final.update(scores)
        best.offer(rl.iterations, final, adapter)
        if start < rl.iterations:  # the final evaluation of this invocation
            report.write(final, images)
            records.append(final)
        report.close()
    if use_ray and start < rl.iterations:
        import ray.train

        # the final adapter's held-out reward: what `medrl tune` ranks trials by
        ray.train.report(
            {k: v for k, v in final.items() if _num(v)}
            if learner.rank == 0
            else {"iteration": rl.iterations}
        )
    _export(learner, run_dir, cfg)
    write_rank_record(
        run_dir,
        learner,
        {
            "iterations_done": rl.iterations,
            "started_at": start,
            "initial_adapter_sha256": initial_digest,
            "adapter_sha256": adapter_digest(adapter),
            "trained_ids": trained_ids,
        },
    )
    dist.barrier()
    return records


def adapter_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of an adapter's weights (keys sorted, float32 bytes): equal iff bitwise equal."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def write_rank_record(run_dir: Path, learner: Learner, record: dict[str, Any]) -> Path:
    """``rl/ranks/rank-NNN.json``: what this rank ended with (adapter hash, the sample ids
    it trained on in this invocation). Ranks of one engine must end with equal hashes."""
    out = run_dir / RL_DIR / "ranks" / f"rank-{learner.rank:03d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"rank": learner.rank, "world": learner.world, **record}))
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = _broadcast(sorted(stats))  # rank 0's keys; every rank trains the same steps
    if not keys:
        return {}
    values = torch.tensor([float(stats.get(k, 0.0)) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


def _export(learner: Learner, run_dir: Path, cfg: Any) -> Path:
    from generators.lora import save_adapter

    out = run_dir / RL_DIR / "adapter"
    with learner.gathered():  # collective under ZeRO-3: every rank enters, rank 0 writes
        if learner.rank == 0:
            save_adapter(
                learner.engine.module,
                out,
                extra={"iterations": cfg.rl.iterations, "run": cfg.run.name},
            )
            log.info("RL adapter written to %s", out)
    return out


# --------------------------------------------------------------------------- Ray

#: set to 0 to start the local Ray without its dashboard (tests do)
DASHBOARD_ENV = "MEDRL_RAY_DASHBOARD"
#: CPU share of a reward service replica on a CPU-only cluster (pixel rewards are cheap)
REWARD_NUM_CPUS = 0.5


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker (a DeepSpeed rank).

    Ray Train has set up the torch.distributed process group (gloo on CPU, NCCL on GPU)
    before this runs; DeepSpeed joins it. Rank 0 draws and scores through the sampler
    and reward actors whose handles come in ``config``, and broadcasts each batch.
    """
    import ray.train

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is first imported
    cfg = config["cfg"]  # the driver's config object (pickled by Ray)
    inputs = config["inputs"]
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    device = "cpu"
    if config.get("use_gpu") and torch.cuda.is_available():
        device = f"cuda:{ctx.get_local_rank()}"
        torch.cuda.set_device(device)
    learner = Learner(inputs["generator_dir"], cfg.lora, cfg.sampling, cfg.rl, device=device)
    backend = None
    if learner.rank == 0:
        backend = RayBackend(config["samplers"], config["rewards"], cfg.rl.sampler_chunk)
    run_iterations(cfg, inputs, learner, backend, use_ray=True)


def _env_for_job(env_vars: dict[str, str]) -> dict[str, str]:
    """``env_vars`` minus those the Ray job's own runtime env sets (Ray refuses to merge a
    driver's runtime env that sets the same variable as the job's)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return env_vars
    try:
        job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (json.JSONDecodeError, AttributeError):
        job_env = {}
    return {k: v for k, v in env_vars.items() if k not in job_env}


def _ray_init(cfg: Any) -> bool:
    """Join or start Ray; True when this call connected (the caller shuts it down).

    - Ray already initialised in this process (tests, Tune trials): used as it is.
    - ``rl.ray_address`` set, or ``RAY_ADDRESS`` (set by Ray inside a job, so
      ``medrl submit -- rl train ...`` lands here): join that cluster.
    - else a local Ray: dashboard on 127.0.0.1 (``MEDRL_RAY_DASHBOARD=0``: none), logical
      CPUs so that the samplers, the reward service and the learner all get scheduled on
      a small machine (they take turns on its cores).
    """
    import ray

    if ray.is_initialized():
        return False
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    address = cfg.rl.ray_address or os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        if address.startswith(("http://", "https://")):
            raise ValueError(
                f"Ray address {address!r} (rl.ray_address or RAY_ADDRESS) is a dashboard / "
                "Jobs API address: run on that cluster with `medrl submit -- rl train ...`, "
                "or give the cluster's GCS address (host:6379) or `auto`"
            )
        env = _env_for_job(env_vars)
        ray.init(address=address, runtime_env={"env_vars": env} if env else None)
        log.info("RL: joined the Ray cluster at %s", address)
        return True
    if not torch.cuda.is_available():
        env_vars["DS_ACCELERATOR"] = "cpu"
    dashboard = os.environ.get(DASHBOARD_ENV, "1").strip().lower() not in ("0", "false", "no")
    rl = cfg.rl
    wanted = rl.num_samplers + rl.learner_workers
    wanted += math.ceil(REWARD_NUM_CPUS * cfg.rewards.service_replicas)
    ctx = ray.init(
        num_cpus=max(os.cpu_count() or 1, wanted),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env_vars},
        configure_logging=False,
    )
    url = getattr(ctx, "dashboard_url", None)
    if dashboard and url:
        print(f"Ray dashboard: http://{url} (RL metrics: ray_medrl_rl_*)", flush=True)
    return True


def run_rl(cfg: Any, callbacks: Sequence[Any] | None = None) -> dict[str, Any]:
    """Driver of ``medrl rl train``: actors, reward service, the TorchTrainer.

    ``callbacks`` go to the trainer's ``RunConfig`` (``medrl tune`` passes Tune's
    ``TuneReportCallback``: every iteration's ``ray.train.report`` reaches the trial).
    Returns ``run_dir``, ``adapter`` (the exported LoRA), ``records`` (the RL records of
    metrics.jsonl) and the Ray Train ``result``. A failed trainer raises (Ray Train's
    ``TrainingFailedError``); the actors are stopped either way.
    """
    import ray
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from rewards.service import start_reward_services
    from rl.samplers import start_samplers

    inputs = resolve_inputs(cfg)
    run_dir = Path(inputs["run_dir"])
    started = _ray_init(cfg)
    # Ray Train would send every print of the workers through its logger *and* stdout
    # (each line twice); the loop prints its own progress lines. Propagated to workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    samplers: list[Any] = []
    rewards: list[Any] = []
    try:
        has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        use_gpu = has_gpu if cfg.rl.learner_use_gpu == "auto" else cfg.rl.learner_use_gpu == "true"
        log.info(
            "RL: %d samplers, %d reward service(s), %d learner worker(s) (%s)",
            cfg.rl.num_samplers,
            cfg.rewards.service_replicas,
            cfg.rl.learner_workers,
            "GPU" if use_gpu else "CPU",
        )
        samplers = start_samplers(
            cfg.rl.num_samplers,
            inputs["generator_dir"],
            cfg.lora,
            cfg.sampling,
            num_gpus=cfg.rl.sampler_num_gpus,
            max_restarts=cfg.rl.sampler_max_restarts,
        )
        rewards = start_reward_services(
            inputs["reward"],
            cfg.rewards,
            replicas=cfg.rewards.service_replicas,
            num_gpus=cfg.rewards.service_num_gpus,
            num_cpus=REWARD_NUM_CPUS,
        )
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": cfg,
                "inputs": inputs,
                "samplers": samplers,
                "rewards": rewards,
                "threads": 1,
                "use_gpu": use_gpu,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.rl.learner_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": 1},
            ),
            run_config=TrainRunConfig(
                name=f"rl-{cfg.run.name}",
                storage_path=str(run_dir / RL_DIR / "ray"),
                callbacks=list(callbacks or []),
            ),
        )
        result = trainer.fit()
    finally:
        for actor in [*samplers, *rewards]:
            try:
                ray.kill(actor)
            except Exception as exc:  # an actor already gone is fine
                log.debug("could not kill %s: %s", actor, exc)
        if started:
            ray.shutdown()
    return {
        "run_dir": run_dir,
        "adapter": run_dir / RL_DIR / "adapter",
        "records": read_rl_records(run_dir),
        "result": result,
    }


def eval_curve(records: Sequence[dict[str, Any]]) -> list[float]:
    """Held-out reward by adapter version (``eval_reward`` of iteration k scores version
    k; the final record, iteration ``rl.iterations``, the exported adapter). A resumed
    run's records repeat iterations: the latest wins. Empty with ``rl.eval_prompts=0``."""
    by_version = {r["iteration"]: r.get("eval_reward") for r in records}
    return [by_version[k] for k in sorted(by_version) if finite(by_version[k])]


def finite(value: Any) -> bool:
    """A real number, not NaN or infinite (metrics read back from JSON)."""
    return _num(value) and math.isfinite(value)


def read_rl_records(run_dir: Path) -> list[dict[str, Any]]:
    """The RL records of the run's metrics.jsonl (runfiles.read_metrics)."""
    return read_metrics(Path(run_dir) / METRICS_FILE, stage="rl")
