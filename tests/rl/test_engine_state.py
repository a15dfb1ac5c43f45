"""The learner's engine state in a checkpoint (rl/engine_state.py): safetensors and JSON,
an exact resume at every ZeRO stage, and nothing unpickled: a malicious pickle planted in
a checkpoint, or a checkpoint of an older medrl (DeepSpeed's ``*.pt`` pickles), is refused
naming the file, and the code in the pickle never runs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from rl.engine_state import (
    ENGINE_DIR,
    PARAMETERS,
    CheckpointFormatError,
    check_engine_dir,
    load_engine_state,
    optimizer_file,
    save_engine_state,
)

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def make_engine(stage: int, shift: float = 0.0):
    """A two-layer model under DeepSpeed at ZeRO ``stage``, its first layer frozen (the
    frozen base), AdamW with weight decay and gradient clipping as the learner has."""
    from rl.learner import _deepspeed_env, init_single_process_group

    _deepspeed_env(cpu_shm=False)
    import deepspeed

    init_single_process_group()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5))
    model[0].requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        model[1].weight.add_(shift)  # another starting point: the load must replace it
    params = [p for p in model.parameters() if p.requires_grad]
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params, config=config
    )
    return engine


def gathered(engine, stage: int):
    import deepspeed

    if stage != 3:
        return contextlib.nullcontext
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return lambda: deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def train(engine, steps: int, g: torch.Generator) -> None:
    for _ in range(steps):
        loss = engine(torch.randn(2, 4, generator=g)).pow(2).sum()
        engine.backward(loss)
        engine.step()


def weights(engine, stage: int) -> dict[str, torch.Tensor]:
    with gathered(engine, stage)():
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def saved_checkpoint(tmp_path: Path, stage: int = 2):
    """An engine trained 3 steps and its checkpoint folder."""
    engine = make_engine(stage)
    train(engine, 3, torch.Generator().manual_seed(1))
    ckpt = tmp_path / "step-000001"
    save_engine_state(engine, ckpt, 0, 1, stage, gathered(engine, stage))
    return engine, ckpt


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_loaded_engine_trains_on_exactly_as_the_saved_one(tmp_path: Path, stage: int):
    g = torch.Generator().manual_seed(1)
    saved = make_engine(stage)
    train(saved, 3, g)
    save_engine_state(saved, tmp_path, 0, 1, stage, gathered(saved, stage))
    rng = g.get_state()
    train(saved, 3, g)

    resumed = make_engine(stage, shift=1.0)
    load_engine_state(resumed, tmp_path, 0, 1, stage)
    g.set_state(rng)
    train(resumed, 3, g)

    a, b = weights(saved, stage), weights(resumed, stage)
    assert not torch.equal(a["1.weight"], weights(make_engine(stage, 1.0), stage)["1.weight"])
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bitwise: parameters and AdamW state
    assert (resumed.global_steps, resumed.global_samples) == (6, 6)
    engine = tmp_path / ENGINE_DIR
    assert sorted(p.name for p in engine.iterdir()) == [
        "engine.json", optimizer_file(0), PARAMETERS,
    ]  # fmt: skip
    meta = json.loads((engine / "engine.json").read_text())
    assert (meta["zero_stage"], meta["world_size"], meta["global_steps"]) == (stage, 1, 3)


class Payload:
    """Unpickling it creates ``marker`` (any code could run instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def evil_pickle(marker: Path) -> bytes:
    """A file as DeepSpeed's ``torch.save`` writes one, holding the payload."""
    buf = io.BytesIO()
    torch.save({"module": Payload(marker)}, buf)
    return buf.getvalue()


def test_the_planted_pickle_would_run_code_when_unpickled(tmp_path: Path):
    """The precondition of the tests below: loading the payload as DeepSpeed did
    (``torch.load(weights_only=False)``) runs its code."""
    path, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "ran"
    path.write_bytes(evil_pickle(marker))
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "planted", ["beside", PARAMETERS, optimizer_file(0), "older-medrl"]
)  # fmt: skip
def test_a_planted_pickle_is_refused_naming_it_and_never_unpickled(tmp_path: Path, planted: str):
    engine, ckpt = saved_checkpoint(tmp_path)
    marker = tmp_path / "code-ran"
    if planted == "beside":  # a pickle next to the engine files
        target = ckpt / ENGINE_DIR / "mp_rank_00_model_states.pt"
        match = "not a file medrl writes"
    elif planted == "older-medrl":  # the engine folder as DeepSpeed's save_checkpoint left it
        shutil.rmtree(ckpt / ENGINE_DIR)
        (ckpt / ENGINE_DIR).mkdir()
        (ckpt / ENGINE_DIR / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
        target = ckpt / ENGINE_DIR / "mp_rank_00_model_states.pt"
        match = "written by an older medrl"
    else:  # a safetensors file replaced by a pickle
        target = ckpt / ENGINE_DIR / planted
        match = "not a safetensors file"
    target.write_bytes(evil_pickle(marker))

    for load in (
        lambda: check_engine_dir(ckpt, world=1, stage=2),
        lambda: load_engine_state(make_engine(2), ckpt, 0, 1, 2),
    ):
        with pytest.raises(CheckpointFormatError, match=match) as err:
            load()
        assert str(target) in str(err.value)
    if planted == "older-medrl":
        assert "start afresh" in str(err.value).lower() and "medrl export" in str(err.value)
    assert not marker.exists()


def test_a_checkpoint_of_another_rank_count_or_zero_stage_is_refused(tmp_path: Path):
    _, ckpt = saved_checkpoint(tmp_path)
    with pytest.raises(CheckpointFormatError, match="rl.learner_workers=1"):
        check_engine_dir(ckpt, world=2, stage=2)
    with pytest.raises(CheckpointFormatError, match="rl.zero_stage=2"):
        check_engine_dir(ckpt, world=1, stage=3)
    (ckpt / ENGINE_DIR / PARAMETERS).unlink()
    with pytest.raises(CheckpointFormatError, match=PARAMETERS):
        check_engine_dir(ckpt)


def test_rl_train_refuses_an_older_checkpoint_before_ray_starts(tmp_path: Path, capsys):
    """`medrl rl train` on a run whose `latest` is a checkpoint of an older medrl: exit 2
    and one line naming the pickle, before any learner (or Ray) starts."""
    import ray

    from medrl.cli import main

    generator = tmp_path / "generator"
    generator.mkdir()
    (generator / "model_index.json").write_text("{}")  # what resolve_inputs looks for
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("colour fundus photograph, left eye\n")
    root = tmp_path / "runs" / "x" / "rl" / "checkpoints"
    (root / "step-000001" / ENGINE_DIR).mkdir(parents=True)
    marker = tmp_path / "code-ran"
    planted = root / "step-000001" / ENGINE_DIR / "mp_rank_00_model_states.pt"
    planted.write_bytes(evil_pickle(marker))
    (root / "latest").write_text("step-000001\n")
    args = ["rl", "train", "--config", "configs/demo.yaml", f"run.root={tmp_path / 'runs'}"]
    args += ["run.name=x", f"rl.generator={generator}", "rl.reward=spatial"]
    args += [f"rl.prompts_file={prompts}"]
    started = ray.is_initialized()
    assert main(args) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("medrl: ")]
    assert "written by an older medrl" in line and str(planted) in line
    assert ray.is_initialized() == started and not marker.exists()
