"""The DDPO iterations (every learner rank runs :func:`run_iterations`).

Rank 0 of the learner runs each iteration:

1. the adapter of version k (k updates so far) goes into the object store once;
2. held-out evaluation prompts are drawn with fixed seeds and scored (version k);
3. the samplers draw ``group_size`` images for each of ``prompts_per_iteration``
   prompts, seeds derived from (run seed, k), each sample with an id;
4. the reward service scores them; rewards join samples by id;
5. advantages are normalised per prompt; stage 2 keeps the samples that pass;
6. every rank trains on its shard (gradients synchronised by DeepSpeed);
7. a checkpoint is committed (rl/checkpoints.py), metrics go to stdout, TensorBoard,
   Ray metrics and metrics.jsonl.

An iteration that trains on nothing (every reward failed, or no sample passed stage 2)
says so in its record (``trained: false`` and the reason under ``untrained``) and commits
no checkpoint; after ``rl.max_empty_iterations`` of them in a row the loop stops with
:class:`EmptyIterationsError`, its latest checkpoint the last one that trained.

Everything an iteration draws is a function of (seed, k) and the adapter, so a rerun
with the same run name resumes from the latest checkpoint and ends with the same adapter
as an uninterrupted run. The same loop runs without Ray (:func:`run_local`, the
single-process reference of benchmarks/rl_iteration.py); on Ray, the driver is
cluster/driver.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rl.checkpoints import (
    BEST_DIR,
    CHECKPOINTS_DIR,
    EVAL_DIR,
    RL_DIR,
    BestAdapter,
    adapter_digest,
    broadcast,
    check_driver,
    commit_rl_checkpoint,
    export_adapter,
    latest_checkpoint,
    write_rank_record,
)
from rl.config import RLRun
from rl.draw_ahead import DRAW_ADAPTERS, DrawAhead
from rl.engine_state import load_rng_state
from rl.gold import make_gold_judge
from rl.inputs import iteration_requests
from rl.learner import Learner, group_advantages
from rl.learners import make_learner, stage_of
from rl.rollout import Backend, LocalBackend, evaluate_adapter, score_map
from rl.samplers import SampleRequest
from rl.trajectories import Trajectories
from runfiles import METRICS_FILE, append_metrics, is_number, lock_token, read_latest
from runfiles.config import to_dict

log = logging.getLogger(__name__)


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
            if is_number(v) and k != "iteration":
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
        if record.get("trained") is False:
            shown += f" (trained on nothing: {record['untrained']})"
        print(f"[rl] iteration {it} {where}: {shown}", flush=True)

    def close(self) -> None:
        self.writer.close()


class EmptyIterationsError(RuntimeError):
    """``rl.max_empty_iterations`` iterations in a row trained on nothing."""


def run_iterations(
    cfg: RLRun,
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
    ckpt_root = run_dir / RL_DIR / CHECKPOINTS_DIR
    token = lock_token(run_dir) if learner.rank == 0 else None  # the driver's, at the start
    start, records = resume(learner, ckpt_root, cfg.run.name), []
    report = IterationLog(run_dir, cfg.run.name, use_ray) if learner.rank == 0 else None
    gold, best = judges(cfg, inputs, learner) if learner.rank == 0 else (None, None)
    ahead = draw_ahead(backend, inputs, cfg, gold, best, ckpt_root, start, learner.rank)
    initial_digest = adapter_digest(learner.adapter_state())  # collective under ZeRO-3
    trained_ids: list[str] = []
    empty = 0  # iterations in a row that trained on nothing
    its = range(start, rl.iterations)
    bar = tqdm(its, "RL iterations", disable=learner.rank != 0, initial=start, total=rl.iterations)
    # an iteration's ``seconds`` runs from the previous one's mark to its own, so the
    # reporting of iteration k-1 (TensorBoard, Ray metrics, ray.train.report) is in k's
    mark = time.perf_counter()
    try:
        for k in bar:
            batch, why, drawn, evaluation = share_batch(ahead, k, learner)
            shard, weights = batch.shard(learner.rank, learner.world)
            trained_ids += [sid for sid, w in zip(shard.ids, weights.tolist(), strict=True) if w]
            t_train = time.perf_counter()
            stats = learner.train(batch, k, cfg.run.seed) if len(batch) else {}
            stats = _mean_over_ranks(stats)
            stats["train_seconds"] = time.perf_counter() - t_train
            done = k + 1
            empty = 0 if len(batch) else empty + 1
            if len(batch) and (done % rl.checkpoint_every == 0 or done == rl.iterations):
                save_checkpoint(learner, ckpt_root, done, cfg, ahead, token)
            record: dict[str, Any] = {"iteration": k}
            if learner.rank == 0:
                eval_images = iteration_record(record, evaluation, drawn, stats)
                now = time.perf_counter()
                record["seconds"], mark = now - mark, now
                report.write(record, eval_images)
                records.append(record)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
            if use_ray:
                import ray.train

                ray.train.report({k2: v for k2, v in record.items() if is_number(v)})
            fail_once_for_tests(k, learner.rank)
            stop_if_empty(empty, rl.max_empty_iterations, why)
    finally:
        if ahead is not None:
            ahead.close()
    adapter = learner.adapter_state()
    if learner.rank == 0:
        final = {"iteration": rl.iterations, "stage_n": 0}
        images = judge_version(backend, inputs, rl.iterations, adapter, rl, gold, best, final)
        if start < rl.iterations:  # the final evaluation of this invocation
            report.write(final, images)
            records.append(final)
        report.close()
    if use_ray and start < rl.iterations:
        import ray.train

        # the final adapter's held-out reward: what `medrl tune` ranks trials by
        ray.train.report(
            {k: v for k, v in final.items() if is_number(v)}
            if learner.rank == 0
            else {"iteration": rl.iterations}
        )
    export_adapter(learner, run_dir, cfg)
    end = {"iterations_done": rl.iterations, "started_at": start, "trained_ids": trained_ids}
    end.update(initial_adapter_sha256=initial_digest, adapter_sha256=adapter_digest(adapter))
    write_rank_record(run_dir, learner, end)
    dist.barrier()
    return records


def iteration_record(
    record: dict[str, Any], evaluation: Future, drawn: dict[str, Any], stats: dict[str, float]
) -> torch.Tensor | None:
    """Rank 0: the iteration's record in order (evaluation, batch, training; waits for the
    evaluation); returns the evaluation images."""
    scores, eval_images = evaluation.result()
    record.update({**scores, **drawn})
    record.update({k: v for k, v in stats.items() if k != "updates"})
    return eval_images


def share_batch(
    ahead: DrawAhead | None, k: int, learner: Learner
) -> tuple[Trajectories, str, dict[str, Any], Future | None]:
    """Every rank: rank 0 queues the evaluation of adapter version ``k`` and the draws up
    to ``k + rl.max_staleness`` (rl/draw_ahead.py), and waits for iteration ``k``'s batch;
    every rank gets the batch and why it is empty ("" when it is not). Rank 0 also gets
    the batch's record keys and the evaluation's future (record keys, images)."""
    batch, why, drawn, evaluation = None, "", {}, None
    adapter = learner.adapter_state()  # on every rank: collective under ZeRO-3
    if learner.rank == 0:
        t0 = time.perf_counter()
        evaluation = ahead.begin(k, adapter)
        batch, drawn = ahead.batch(k)
        why = drawn.get("untrained", "")
        drawn = {**drawn, "wait_seconds": time.perf_counter() - t0}  # the learner idle
    batch, why = broadcast((batch, why))
    return batch, why, drawn, evaluation


def draw_ahead(
    backend: Backend | None,
    inputs: dict[str, Any],
    cfg: RLRun,
    gold: Any,
    best: BestAdapter | None,
    ckpt_root: Path,
    start: int,
    rank: int,
) -> DrawAhead | None:
    """Rank 0's :class:`DrawAhead` over ``backend`` (None on the other ranks), holding the
    adapters that drew the iterations pending at ``start`` when resuming."""
    if rank != 0:
        return None
    rl = cfg.rl

    def evaluate(k: int, adapter: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor | None]:
        t0 = time.perf_counter()
        scores: dict[str, Any] = {"iteration": k}  # what rl/best sees, as before
        images = judge_version(backend, inputs, k, adapter, rl, gold, best, scores)
        del scores["iteration"]
        scores["eval_seconds"] = time.perf_counter() - t0
        return scores, images

    def draw(k: int, version: int, adapter: dict[str, torch.Tensor]):
        requests = iteration_requests(
            inputs["train_prompts"], k, rl.prompts_per_iteration, rl.group_size, cfg.run.seed
        )
        drawn: dict[str, Any] = {}
        stage, t0 = stage_of(rl, k), time.perf_counter()
        batch = draw_batch(backend, requests, version, adapter, stage, rl.adv_clip, drawn)
        drawn.update(staleness=k - version, draw_seconds=time.perf_counter() - t0)
        if not drawn["trained"]:
            log.warning("iteration %d trains on nothing: %s", k, drawn["untrained"])
        return batch, drawn

    ahead = DrawAhead(draw, evaluate, rl.max_staleness, rl.iterations)
    ahead.restore(read_latest(ckpt_root) if start else None, start)
    return ahead


def stop_if_empty(empty: int, limit: int, why: str) -> None:
    """Raise :class:`EmptyIterationsError` once ``limit`` iterations in a row trained on
    nothing (``limit`` 0: never)."""
    if limit and empty >= limit:
        raise EmptyIterationsError(
            f"{empty} RL iterations in a row trained on nothing (rl.max_empty_iterations="
            f"{limit}); the last one: {why}. They committed no checkpoint: fix the cause and "
            "rerun the same run name to resume from the last checkpoint that trained"
        )


#: test hook: path of a marker file holding an iteration number; rank 0 deletes it and
#: raises at the end of that iteration (once: the restarted loop, a retried Tune trial or
#: any other run sharing the environment finds no marker)
FAIL_ONCE_ENV = "MEDRL_TEST_FAIL_ONCE"


class InjectedFailure(RuntimeError):
    """The one-time failure that :data:`FAIL_ONCE_ENV` asks for (tests only)."""


def fail_once_for_tests(k: int, rank: int) -> None:
    """Rank 0: raise :class:`InjectedFailure` after iteration ``k`` when the marker file
    that ``MEDRL_TEST_FAIL_ONCE`` names holds ``k`` (the marker is removed first)."""
    marker = os.environ.get(FAIL_ONCE_ENV)
    if rank != 0 or not marker:
        return
    path = Path(marker)
    try:
        at = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    if at == k:
        try:
            path.unlink()
        except FileNotFoundError:  # another run (a concurrent Tune trial) took it first
            return
        raise InjectedFailure(f"{FAIL_ONCE_ENV}: injected failure after iteration {k}")


def untrained_reason(samples: int, scored: int) -> str:
    """Why an iteration of ``samples`` draws, ``scored`` of them with a reward, trains on
    nothing."""
    if scored == 0:
        return f"every sample's reward failed ({samples} of {samples}; the errors are logged)"
    return f"no sample passed the stage-2 gate ({scored} scored, none reached the threshold)"


def judge_version(
    backend: Backend,
    inputs: dict[str, Any],
    version: int,
    adapter: dict[str, torch.Tensor],
    rl: Any,
    gold: Any,
    best: BestAdapter,
    record: dict[str, Any],
) -> torch.Tensor | None:
    """Rank 0: the held-out proxy and gold of adapter ``version`` into ``record``, offered to
    the best-adapter keeper; returns the evaluation images."""
    scores, images = evaluate_adapter(
        backend, inputs["eval_prompts"], version, version, adapter, rl, gold
    )
    record.update(scores)
    best.offer(version, record, adapter)
    return images


def judges(cfg: RLRun, inputs: dict[str, Any], learner: Learner) -> tuple[Any, BestAdapter]:
    """Rank 0's gold judge (None for ``rl.gold=none``) and the best-adapter keeper."""
    gold = make_gold_judge(cfg.rl.gold, inputs.get("gold_reference", []), cfg.model.resolution)
    best = BestAdapter(
        Path(inputs["run_dir"]) / RL_DIR / BEST_DIR,
        cfg.rl.select_by,
        learner.adapter_config(),
        cfg.rl.max_fd_increase,
    )
    return gold, best


def save_checkpoint(
    learner: Learner,
    ckpt_root: Path,
    done: int,
    cfg: RLRun,
    ahead: DrawAhead | None = None,
    token: str | None = None,
) -> Path:
    """Collective: the checkpoint after ``done`` iterations (what :func:`resume` reads),
    with the adapters that draw the iterations still pending (rank 0's ``ahead``); first,
    :func:`check_driver` (the driver that took the run's lock with ``token`` still holds it)."""
    check_driver(ckpt_root.parent.parent, token, learner.rank)  # runs/<name>/rl/checkpoints
    state = {
        "iterations_done": done,
        "optimizer_steps": learner.optimizer_steps,
        "adapter_version": done,
        "config": to_dict(cfg),
    }
    extra = {}
    if ahead is not None:
        extra = {f"{DRAW_ADAPTERS}/{n}": a for n, a in ahead.pending_adapters(done).items()}
    return commit_rl_checkpoint(
        learner, ckpt_root, done, state, cfg.rl.keep_checkpoints, tensor_files=extra
    )


def resume(learner: Learner, ckpt_root: Path, run_name: str) -> int:
    """Load the checkpoint ``latest`` names, if any (engine, optimizer steps, RNG); the
    number of iterations it has done (0 without one)."""
    latest = latest_checkpoint(ckpt_root, clean=learner.rank == 0)
    if latest is None:
        return 0
    learner.load(latest)
    state = json.loads((latest / "state.json").read_text())
    learner.optimizer_steps = int(state.get("optimizer_steps", 0))
    load_rng_state(latest / "rng.json")
    start = int(state["iterations_done"])
    if learner.rank == 0:
        log.info("resuming %s after iteration %d (%s)", run_name, start - 1, latest)
    return start


def draw_batch(
    backend: Backend,
    requests: Sequence[SampleRequest],
    version: int,
    adapter: dict[str, torch.Tensor],
    stage: int,
    adv_clip: float,
    record: dict[str, Any],
) -> Trajectories:
    """Rank 0: draw the iteration's samples with adapter ``version``, score them, normalise
    advantages per prompt and keep what the stage trains on (stage 2: the samples that
    pass); the iteration's reward statistics go into ``record``."""
    t_draw = time.perf_counter()
    traj = backend.draw(requests, version, adapter)
    draw_s = time.perf_counter() - t_draw
    assert all(v == version for v in traj.versions), "a sample drew with a stale adapter"
    rows, rewards, passed = score_map(traj, backend.score(traj))
    traj = traj.select(rows)
    adv = group_advantages(traj.prompts, rewards, adv_clip)
    keep = list(range(len(traj))) if stage == 1 else [i for i, p in enumerate(passed) if p]
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
    record["trained"] = bool(keep)
    if not keep:
        record["untrained"] = untrained_reason(len(requests), len(rows))
    return traj.for_learner(adv, keep)  # no images: no learner rank trains on them


def _mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = broadcast(sorted(stats))  # rank 0's keys; every rank trains the same steps
    if not keys:
        return {}
    values = torch.tensor([float(stats.get(k, 0.0)) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


def run_local(
    cfg: RLRun,
    inputs: dict[str, Any],
    reward: Any = None,
    learner_seed: int = 0,
    device: str = "cpu",
) -> tuple[list[dict[str, Any]], Learner]:
    """The loop in one process, no Ray: one :class:`Sampler`, the reward, one learner
    (``rl.algorithm``'s, :func:`rl.learners.make_learner`).

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
    learner = make_learner(cfg, gen_dir, inputs, device=device, seed=learner_seed)
    Path(inputs["run_dir"]).mkdir(parents=True, exist_ok=True)
    records = run_iterations(cfg, inputs, learner, LocalBackend(sampler, reward), use_ray=False)
    return records, learner
