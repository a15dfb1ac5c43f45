"""``medrl rl train`` on Ray: starting or joining Ray, the sampler actors and the reward
service, and a Ray Train ``TorchTrainer`` whose workers each hold a
:class:`rl.learner.Learner` (DeepSpeed over the UNet, LoRA only; the subclass
``rl.algorithm`` names, :mod:`rl.learners`) and run
:func:`rl.loop.run_iterations`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rl.checkpoints import CHECKPOINTS_DIR, RL_DIR, check_resumable
from rl.config import RLRun
from rl.inputs import resolve_inputs
from rl.learners import make_learner
from rl.loop import run_iterations
from rl.records import read_rl_records
from rl.rollout import RayBackend

log = logging.getLogger(__name__)


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
    learner = make_learner(cfg, inputs["generator_dir"], inputs, device=device)
    backend = None
    if learner.rank == 0:
        backend = RayBackend(config["samplers"], config["rewards"], cfg.rl.sampler_chunk)
    run_iterations(cfg, inputs, learner, backend, use_ray=True)


def env_for_job(env_vars: dict[str, str]) -> dict[str, str]:
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


def ray_init(cfg: RLRun) -> bool:
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
        env = env_for_job(env_vars)
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


def _learner_uses_gpu(cfg: RLRun) -> bool:
    """``rl.learner_use_gpu``; ``auto``: whether the Ray cluster has GPUs."""
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return has_gpu if cfg.rl.learner_use_gpu == "auto" else cfg.rl.learner_use_gpu == "true"


def _trainer(
    cfg: RLRun,
    inputs: dict[str, Any],
    samplers: list[Any],
    rewards: list[Any],
    use_gpu: bool,
    callbacks: Sequence[Any] | None,
) -> Any:
    """The ``TorchTrainer`` whose workers run :func:`train_loop_per_worker` with these actors."""
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
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
            storage_path=str(Path(inputs["run_dir"]) / RL_DIR / "ray"),
            callbacks=list(callbacks or []),
            # a restarted worker group resumes from the loop's own ``latest`` checkpoint
            failure_config=FailureConfig(max_failures=cfg.rl.max_failures),
        ),
    )


def _stop(actors: list[Any], shutdown: bool) -> None:
    """Kill the actors (one already gone is fine), then shut Ray down if ``shutdown``."""
    import ray

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception as exc:  # an actor already gone is fine
            log.debug("could not kill %s: %s", actor, exc)
    if shutdown:
        ray.shutdown()


def run_rl(cfg: RLRun, callbacks: Sequence[Any] | None = None) -> dict[str, Any]:
    """Driver of ``medrl rl train``: actors, reward service, the TorchTrainer.

    ``callbacks`` go to the trainer's ``RunConfig`` (``medrl tune`` passes Tune's
    ``TuneReportCallback``: every iteration's ``ray.train.report`` reaches the trial).
    Returns ``run_dir``, ``adapter`` (the exported LoRA), ``records`` (the RL records of
    metrics.jsonl) and the Ray Train ``result``. A failed trainer raises (Ray Train's
    ``TrainingFailedError``); the actors are stopped either way.
    """
    from rewards.service import start_reward_services
    from rl.samplers import start_samplers

    inputs = resolve_inputs(cfg)
    run_dir = Path(inputs["run_dir"])
    check_resumable(run_dir / RL_DIR / CHECKPOINTS_DIR, cfg.rl)  # before Ray starts
    started = ray_init(cfg)
    # Ray Train would send every print of the workers through its logger *and* stdout
    # (each line twice); the loop prints its own progress lines. Propagated to workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    samplers: list[Any] = []
    rewards: list[Any] = []
    try:
        use_gpu = _learner_uses_gpu(cfg)
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
        result = _trainer(cfg, inputs, samplers, rewards, use_gpu, callbacks).fit()
    finally:
        _stop([*samplers, *rewards], started)
    return {
        "run_dir": run_dir,
        "adapter": run_dir / RL_DIR / "adapter",
        "records": read_rl_records(run_dir),
        "result": result,
    }
