"""The learner's engine state in a checkpoint: safetensors and JSON, nothing unpickled.

DeepSpeed's ``save_checkpoint`` writes ``*.pt`` pickles that its ``load_checkpoint``
unpickles with ``weights_only=False``: whoever can write a run directory on a shared
volume would run code in the learner. A checkpoint's ``engine/`` holds instead:

- ``engine.json``: the format and version, the ZeRO stage and world size it was written
  with, and the engine's step counters (``global_steps``, ``global_samples``,
  ``skipped_steps``: what DeepSpeed's own checkpoint restores);
- ``parameters.safetensors``: the trainable (LoRA) parameters by name, whole (rank 0
  writes them, gathered under ZeRO-3); the frozen base comes from ``rl.generator``;
- ``optimizer-rank-NNNNN.safetensors``, one per rank: the optimizer's ``state_dict()``
  (AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``, the param groups' hyperparameters;
  under ZeRO-1/2/3 this rank's partition of them and of the fp32 master weights), its
  tensors as tensors and its structure as JSON in the file's metadata (``medrl.tree``).

Loading reads these names only, through ``safetensors`` and ``json``, and refuses an
``engine/`` that holds anything else (a pickle planted beside them, the ``*.pt`` files of
a checkpoint written by an older medrl) or a file that is not what its name says,
naming the file (:class:`CheckpointFormatError`). The world size and ZeRO stage must be
those the checkpoint was written with (ZeRO partitions the optimizer state per rank).

The checkpoint's ``rng.json`` (Python's, NumPy's and torch's generator states as lists of
ints: :func:`save_rng_state`) is JSON too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runfiles import atomic_write_text, check_format

ENGINE_DIR = "engine"
ENGINE_META = "engine.json"
PARAMETERS = "parameters.safetensors"
ENGINE_FORMAT, ENGINE_VERSION = "medrl-rl-engine", 1
#: the safetensors metadata key of an optimizer file's structure (JSON)
TREE_KEY = "medrl.tree"
COUNTERS = ("global_steps", "global_samples", "skipped_steps")
#: ZeRO ``state_dict()`` entries that are objects, not data: the loss scaler (medrl trains
#: in float32: a static scale of 1; the live engine's own is put back on load) and the
#: parameter slice map of DeepSpeed's universal checkpoints (a rigid load never reads it)
NOT_SAVED = ("loss_scaler", "param_slice_mappings")


class CheckpointFormatError(ValueError):
    """A checkpoint's engine state is not one this medrl writes (the message names the file)."""


def optimizer_file(rank: int) -> str:
    return f"optimizer-rank-{rank:05d}.safetensors"


# --------------------------------------------------------------------------- the tree codec


def pack(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` (dicts, lists, tuples, tensors, JSON scalars) as JSON, its tensors moved to
    ``tensors`` under their path; TypeError naming the path of anything else."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": path}
    if obj is None or isinstance(obj, (bool, str, float)):
        return obj
    if isinstance(obj, int):
        return int(obj)  # an IntEnum (ZeRO's stage) as its number
    if isinstance(obj, (list, tuple)):
        items = [pack(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"tuple": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: pack(v, f"{path}.{k}", tensors) for k, v in obj.items()}}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"intdict": {str(k): pack(v, f"{path}.{k}", tensors) for k, v in obj.items()}}
    raise TypeError(f"engine state {path}: a {type(obj).__name__}, not a tensor or JSON value")


def unpack(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The inverse of :func:`pack`; CheckpointFormatError naming ``where`` on a bad node."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [unpack(v, tensors, where) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        ((tag, value),) = node.items()
        if tag == "tensor" and value in tensors:
            return tensors[value]
        if tag == "tuple" and isinstance(value, list):
            return tuple(unpack(v, tensors, where) for v in value)
        if tag in ("dict", "intdict") and isinstance(value, dict):
            key = int if tag == "intdict" else str
            return {key(k): unpack(v, tensors, where) for k, v in value.items()}
    raise CheckpointFormatError(f"{where}: a malformed engine state entry {str(node)[:80]}")


# --------------------------------------------------------------------------- files


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``path``, read by safetensors (which runs no code);
    CheckpointFormatError naming the file when it is missing or not safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as exc:  # SafetensorError, OSError: either way not loadable
        raise CheckpointFormatError(
            f"{path}: not a safetensors file ({exc}); medrl loads engine state only from "
            "safetensors and JSON, and never unpickles a checkpoint file"
        ) from exc


def _old_format(engine: Path, found: list[str]) -> CheckpointFormatError:
    ckpt = engine.parent
    return CheckpointFormatError(
        f"{ckpt}: written by an older medrl (DeepSpeed pickles: {engine / found[0]}); this "
        "medrl never unpickles checkpoint files, so it cannot resume this run. Start afresh "
        f"(another run.name, or move {ckpt.parent} aside); its adapter, {ckpt / 'adapter'}, "
        "is safetensors and can still be used (medrl export)"
    )


def check_engine_dir(ckpt: Path, world: int | None = None, stage: int | None = None) -> dict:
    """``ckpt/engine``'s metadata if it is this medrl's engine state (the files it writes
    and nothing else; every safetensors header readable) for ``world`` ranks at ZeRO
    ``stage`` (None: not checked); CheckpointFormatError naming the file otherwise."""
    from safetensors import safe_open

    engine = Path(ckpt) / ENGINE_DIR
    meta_path = engine / ENGINE_META
    names = sorted(p.name for p in engine.iterdir()) if engine.is_dir() else []
    if not meta_path.is_file():
        pickles = [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl")) or n == "latest"]
        if pickles:
            raise _old_format(engine, pickles)
        raise CheckpointFormatError(f"{meta_path}: missing; {ckpt} is not a medrl RL checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{meta_path}: not readable JSON ({exc})") from exc
    check_format(meta, ENGINE_FORMAT, ENGINE_VERSION, str(meta_path), "RL engine state")
    saved_world, saved_stage = meta.get("world_size"), meta.get("zero_stage")
    if not isinstance(saved_world, int) or saved_world < 1 or saved_stage not in (0, 1, 2, 3):
        raise CheckpointFormatError(
            f"{meta_path}: world_size {saved_world!r} and zero_stage {saved_stage!r} are not "
            "a rank count and a ZeRO stage (0 to 3)"
        )
    expected = {ENGINE_META, PARAMETERS, *(optimizer_file(r) for r in range(saved_world))}
    for name in names:
        if name not in expected:
            raise CheckpointFormatError(
                f"{engine / name}: not a file medrl writes into a checkpoint's engine state "
                "(it loads only engine.json and its safetensors, and never unpickles); "
                "refusing the checkpoint"
            )
    for name in sorted(expected - {ENGINE_META}):
        try:
            with safe_open(str(engine / name), framework="pt", device="cpu"):
                pass
        except Exception as exc:
            raise CheckpointFormatError(
                f"{engine / name}: missing or not a safetensors file ({exc}); medrl never "
                "unpickles a checkpoint file"
            ) from exc
    if world is not None and saved_world != world:
        raise CheckpointFormatError(
            f"{meta_path}: written by {saved_world} learner rank(s), this run has {world} "
            f"(ZeRO partitions the optimizer per rank): set rl.learner_workers={saved_world}"
        )
    if stage is not None and saved_stage != stage:
        raise CheckpointFormatError(
            f"{meta_path}: written with ZeRO stage {saved_stage}, this run uses {stage}: "
            f"set rl.zero_stage={saved_stage}"
        )
    return meta


# --------------------------------------------------------------------------- save, load


def _trainable(engine: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in engine.module.named_parameters() if p.requires_grad}


def save_engine_state(engine: Any, ckpt: Path, rank: int, world: int, stage: int, gathered) -> None:
    """Collective: every rank writes its optimizer file into ``ckpt/engine``; rank 0 the
    parameters (inside ``gathered``, which every rank enters) and ``engine.json``."""
    from safetensors.torch import save_file

    out = Path(ckpt) / ENGINE_DIR
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in engine.optimizer.state_dict().items() if k not in NOT_SAVED}
    tensors: dict[str, torch.Tensor] = {}
    tree = pack(state, "optimizer", tensors)
    save_file(tensors, str(out / optimizer_file(rank)), metadata={TREE_KEY: json.dumps(tree)})
    with gathered():
        if rank == 0:
            params = {n: p.detach().cpu().clone() for n, p in _trainable(engine).items()}
            save_file(params, str(out / PARAMETERS))
    if rank == 0:
        meta = {"format": ENGINE_FORMAT, "version": ENGINE_VERSION, "zero_stage": stage}
        meta |= {"world_size": world, **{c: int(getattr(engine, c)) for c in COUNTERS}}
        atomic_write_text(out / ENGINE_META, json.dumps(meta, indent=2) + "\n")


def _load_parameters(engine: Any, path: Path, stage: int) -> None:
    import contextlib

    import deepspeed

    saved, _ = read_safetensors(path)
    params = _trainable(engine)
    if saved.keys() != params.keys():
        missing, extra = sorted(params.keys() - saved), sorted(saved.keys() - params)
        raise CheckpointFormatError(
            f"{path}: not this run's adapter (missing {missing[:3]}, unknown {extra[:3]}): "
            "another lora.* setting than the run that wrote it?"
        )
    gather = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
    with gather if stage == 3 else contextlib.nullcontext(), torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise CheckpointFormatError(f"{path}: {name} is {tuple(saved[name].shape)}")
            p.copy_(saved[name])


def load_engine_state(engine: Any, ckpt: Path, rank: int, world: int, stage: int) -> None:
    """Every rank: the parameters, this rank's optimizer state and the step counters from
    ``ckpt/engine`` (checked first: :func:`check_engine_dir`)."""
    meta = check_engine_dir(ckpt, world, stage)
    engine_dir = Path(ckpt) / ENGINE_DIR
    _load_parameters(engine, engine_dir / PARAMETERS, stage)
    path = engine_dir / optimizer_file(rank)
    tensors, metadata = read_safetensors(path)
    try:
        tree = json.loads(metadata[TREE_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{path}: no readable {TREE_KEY} metadata ({exc})") from exc
    state = unpack(tree, tensors, str(path))
    opt = engine.optimizer
    if stage == 0:
        opt.load_state_dict(state)
    else:  # a rigid ZeRO load reads this rank's entry of the list only
        state["loss_scaler"] = opt.loss_scaler
        shards = [state if r == rank else None for r in range(world)]
        opt.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)
    for counter in COUNTERS:
        setattr(engine, counter, int(meta[counter]))


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def save_rng_state(path: Path) -> None:
    """RNG states as JSON (lists of ints): nothing pickled."""
    st = rng_state()
    py = st["python"]
    np_state = st["numpy"]
    data = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": st["torch"].tolist(),
    }
    path.write_text(json.dumps(data))


def load_rng_state(path: Path) -> None:
    data = json.loads(path.read_text())
    py = data["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = data["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    torch.set_rng_state(torch.tensor(data["torch"], dtype=torch.uint8))
