"""What an RL run keeps on disk: checkpoints (collective, committed through runfiles, then
the ``latest`` pointer), the best adapter so far (``rl/best``), the exported adapter
(``rl/adapter``) and each rank's end record (``rl/ranks``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rl.config import RLConfig, RLRun
from rl.engine_state import check_engine_dir, save_rng_state
from rl.gold import selection_score
from rl.learner import Learner
from rl.records import finite
from runfiles import (
    atomic_write_text,
    clean_temporaries,
    commit_folder,
    prune_checkpoints,
    read_latest,
    write_latest,
)

log = logging.getLogger(__name__)


RL_DIR = "rl"
#: ``runs/<name>/rl/checkpoints``: the committed checkpoints and ``latest``
CHECKPOINTS_DIR = "checkpoints"
#: ``runs/<name>/rl/best``: the adapter version with the best held-out score (rl.select_by)
BEST_DIR = "best"
#: ``runs/<name>/rl/eval/version-NNNN.png``: the evaluation images of each adapter version
EVAL_DIR = "eval"


# --------------------------------------------------------------------------- checkpoints


def broadcast(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def commit_rl_checkpoint(
    learner: Learner,
    ckpt_root: Path,
    done: int,
    state: dict[str, Any],
    keep: int,
    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Collective. Every rank writes its engine state into a temporary directory; rank 0
    adds adapter, state, RNG and ``tensor_files`` (relative path -> tensors, as
    safetensors), commits it into place (runfiles), then writes ``latest``, then deletes
    checkpoints beyond ``keep`` (oldest first)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from generators.lora import save_adapter

    name = f"step-{done:06d}"
    final = ckpt_root / name
    tmp = None
    if learner.rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=ckpt_root, prefix=f".{name}.tmp-")
    tmp = Path(broadcast(tmp))
    try:
        learner.save(tmp)
        dist.barrier()
        with learner.gathered():  # collective under ZeRO-3: every rank enters, rank 0 writes
            if learner.rank == 0:
                save_adapter(learner.engine.module, tmp / "adapter", formats=("diffusers",))
        if learner.rank == 0:
            save_rng_state(tmp / "rng.json")
            for rel, tensors in (tensor_files or {}).items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(tmp / rel))
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


def latest_checkpoint(ckpt_root: Path, clean: bool) -> Path | None:
    """At a run's start: the checkpoint ``latest`` names (validated: runfiles), None before
    the first. With ``clean`` (rank 0), what an interrupted commit left in ``ckpt_root`` is
    removed first (its temporary folders and files; a folder committed but not yet named
    by ``latest`` stays, and is committed again over)."""
    if clean:
        clean_temporaries(ckpt_root)
    return read_latest(ckpt_root)


def check_resumable(ckpt_root: Path, cfg: RLConfig) -> Path | None:
    """Before any learner starts: the checkpoint ``latest`` names (None before the first),
    if its engine state is one this run can load (this medrl's safetensors and JSON, the
    run's rank count and ZeRO stage); CheckpointFormatError naming the file otherwise."""
    latest = read_latest(ckpt_root)
    if latest is not None:
        check_engine_dir(latest, world=cfg.learner_workers, stage=cfg.zero_stage)
    return latest


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


def export_adapter(learner: Learner, run_dir: Path, cfg: RLRun) -> Path:
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


class DriverGone(RuntimeError):
    """This learner's driver no longer holds the run directory: nothing more is written."""


def check_driver(run_dir: Path, token: str | None, rank: int) -> None:
    """Collective: raise :class:`DriverGone` on every rank when rank 0 finds that the driver
    which started this run no longer holds ``run_dir``'s lock (``token``, read at the
    start; None: the run holds no lock, e.g. the single-process loop). Asked before each
    checkpoint: Ray's workers can outlive a driver killed with SIGKILL, and must not
    commit beside the driver that reruns the command."""
    from runfiles import holder_gone

    why = holder_gone(run_dir, token) if rank == 0 and token else ""
    why = broadcast(why)
    if why:
        raise DriverGone(f"{why}: this learner stops without writing")
