"""The RL loop on Ray: sampler actors that die, adapter versions, the TorchTrainer run.

One local Ray (no dashboard, logical CPUs so every actor gets scheduled on a 2-core
machine) is shared by the module. The sampler tests use two actors on the 32 px test
generator; the run tests start ``run_rl`` (samplers, reward service, Ray Train workers
with DeepSpeed on CPU over gloo) and read what it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from rl.samplers import Sampler, SampleRequest, draw_samples, start_samplers
from tests.rl.conftest import PROMPTS, RL_OVERRIDES, rl_config

RUN_METRICS = ("reward_mean", "reward_std", "pass_rate", "approx_kl", "clipfrac", "samples_per_s")


@pytest.fixture(scope="module")
def fail_marker(tmp_path_factory) -> Path:
    """Where a test writes the iteration after which the loop fails once (rl.loop's
    MEDRL_TEST_FAIL_ONCE, set in the Ray workers' env; absent: no failure)."""
    return tmp_path_factory.mktemp("rlfail") / "fail-after"


@pytest.fixture(scope="module")
def ray_local(fail_marker):
    from rl.loop import FAIL_ONCE_ENV

    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        env = {
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            FAIL_ONCE_ENV: str(fail_marker),
        }
        # logical CPUs: 2 samplers + 2 learner ranks + reward service (+ the sampler
        # fixture's actors, idle by then) all fit; they take turns on the real cores
        ray.init(
            num_cpus=8, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True
        )
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rlprompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def sampler_cfg(tmp_path_factory):
    return rl_config(tmp_path_factory.mktemp("rlsamplers"))


@pytest.fixture(scope="module")
def local_sampler(rl_generator_dir, sampler_cfg) -> Sampler:
    """The same sampler in this process: the reference images, and the adapter's keys."""
    return Sampler(str(rl_generator_dir), sampler_cfg.lora, sampler_cfg.sampling, device="cpu")


@pytest.fixture(scope="module")
def adapters(local_sampler) -> list[dict[str, torch.Tensor]]:
    """Adapter versions 0 (as attached: B = 0) and 1 (B random: the images change)."""
    from generators.lora import get_adapter_state

    v0 = get_adapter_state(local_sampler.gen.unet)
    g = torch.Generator().manual_seed(3)
    v1 = {
        k: (torch.randn(v.shape, generator=g) * 0.3 if "lora_B" in k else v.clone())
        for k, v in v0.items()
    }
    return [v0, v1]


@pytest.fixture(scope="module")
def samplers(ray_local, rl_generator_dir, sampler_cfg):
    """Two sampler actors as run_rl starts them (Ray restarts them and retries calls)."""
    handles = start_samplers(2, str(rl_generator_dir), sampler_cfg.lora, sampler_cfg.sampling)
    yield handles
    for h in handles:
        ray_local.kill(h)


def _requests(n: int, prefix: str) -> list[SampleRequest]:
    return [
        SampleRequest(f"{prefix}-{i:03d}", PROMPTS[i % len(PROMPTS)], 500 + i) for i in range(n)
    ]


def _kill_during_draw(ray, handles, requests, version, ref, chunk):
    """draw_samples while a thread SIGKILLs the actor that returned the first chunk, right
    after it got its next one. Returns (trajectories, meta, chunk ids seen, killed pid)."""
    first: list[int] = []
    seen: list[str] = []
    chunk_done = threading.Event()

    def on_chunk(part):
        seen.extend(part.ids)
        if not first:
            first.append(part.meta["pid"])
            chunk_done.set()

    def killer():
        if chunk_done.wait(120):
            time.sleep(0.05)  # the driver has handed that actor its next chunk by now
            os.kill(first[0], signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    traj, meta = draw_samples(handles, requests, version, ref, chunk, on_chunk=on_chunk)
    thread.join(timeout=30)
    return traj, meta, seen, first[0]


def test_ray_backend_scores_each_chunk_while_the_rest_draw(ray_local, samplers, adapters):
    """Scoring overlaps drawing: every chunk goes to the reward service as it comes back,
    and the collected scores equal one call over the batch."""
    from rewards.service import score_with_services, start_reward_services
    from rl.rollout import RayBackend

    rewards = start_reward_services("brightness", {"service_batch_size": 4}, num_cpus=0.5)
    try:
        backend = RayBackend(samplers, rewards, chunk=2)
        traj = backend.draw(_requests(8, "overlap"), 1, adapters[1])
        # the actor runs calls in order: info() answers after every call submitted before it,
        # so the four chunk calls were submitted during draw(), before score() was called
        assert ray_local.get(rewards[0].info.remote())["calls"] == 4
        overlapped = backend.score(traj)
        whole = score_with_services(rewards, traj.images, traj.prompts, traj.ids)
        assert not overlapped.errors and set(overlapped.scores) == set(traj.ids)
        for sid, score in whole.scores.items():  # a mean over a copy or a slice: last bits
            assert overlapped.scores[sid].reward == pytest.approx(score.reward, abs=1e-6)
            assert overlapped.scores[sid].passed == score.passed
        assert ray_local.get(rewards[0].info.remote())["calls"] == 4 + 1
        part = traj.select([0, 1])  # not what draw() returned: scored in one call
        assert set(backend.score(part).scores) == set(part.ids)
    finally:
        for handle in rewards:
            ray_local.kill(handle)


def _info(ray, handle, timeout: float = 120.0) -> dict:
    """``info()`` of an actor that may still be restarting (without Ray's retries a call
    to a restarting actor fails at once)."""
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(handle.info.remote(), timeout=timeout)
        except RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _check_killed_draw(ray, handles, reference, requests, traj, seen, killed_pid):
    ids = [r.sample_id for r in requests]
    assert traj.ids == ids  # request order
    assert sorted(seen) == sorted(ids)  # every id came back exactly once (no duplicates)
    assert traj.seeds == [r.seed for r in requests]
    assert traj.versions == reference.versions
    # redrawn samples are the samples the dead actor would have drawn: same seeds, version
    torch.testing.assert_close(traj.images, reference.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(traj.latents, reference.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(traj.log_probs, reference.log_probs, rtol=1e-5, atol=1e-5)
    pids = [_info(ray, h)["pid"] for h in handles]
    assert killed_pid not in pids  # the killed actor was restarted (a new process)


def test_sampler_killed_mid_iteration_is_restarted_and_nothing_is_lost(
    ray_local, samplers, adapters, local_sampler
):
    requests = _requests(16, "kill")
    ref = ray_local.put(adapters[1])
    reference, _ = draw_samples(samplers, requests, 1, ref, chunk=2)
    assert reference.versions == [1] * 16
    local = local_sampler.sample(requests[:4], 1, [adapters[1]])
    # another process with another thread count: float sums differ in the last bits (a run
    # with OMP_NUM_THREADS=1 in the test process measured 1.1e-5)
    torch.testing.assert_close(reference.images[:4], local.images, rtol=0, atol=1e-4)

    traj, meta, seen, killed = _kill_during_draw(ray_local, samplers, requests, 1, ref, 2)
    _check_killed_draw(ray_local, samplers, reference, requests, traj, seen, killed)
    # the restarted actor fetched version 1 again before drawing
    infos = [ray_local.get(h.info.remote()) for h in samplers]
    assert all(i["version"] == 1 for i in infos)


@pytest.mark.slow
def test_killed_sampler_without_ray_retries_is_redrawn_by_draw_samples(
    ray_local, rl_generator_dir, sampler_cfg, adapters
):
    """max_task_retries=0: the unfinished chunk fails with RayActorError and draw_samples
    submits it again; still every id exactly once, the same images."""
    handles = start_samplers(
        2, str(rl_generator_dir), sampler_cfg.lora, sampler_cfg.sampling, max_task_retries=0
    )
    try:
        requests = _requests(12, "redraw")
        ref = ray_local.put(adapters[1])
        reference, _ = draw_samples(handles, requests, 1, ref, chunk=2)
        traj, meta, seen, killed = _kill_during_draw(ray_local, handles, requests, 1, ref, 2)
        assert meta["redrawn"] > 0
        _check_killed_draw(ray_local, handles, reference, requests, traj, seen, killed)
    finally:
        for h in handles:
            ray_local.kill(h)


def test_adapter_versions_are_fetched_once_and_never_half_applied(
    ray_local, samplers, adapters, local_sampler
):
    from ray.exceptions import RayTaskError

    before = [ray_local.get(h.info.remote()) for h in samplers]
    requests = _requests(8, "ver")
    v0 = draw_samples(samplers, requests, 10, ray_local.put(adapters[0]), chunk=2)[0]
    ref1 = ray_local.put(adapters[1])
    v1 = draw_samples(samplers, requests, 11, ref1, chunk=2)[0]
    assert v0.versions == [10] * 8 and v1.versions == [11] * 8
    assert (v0.images - v1.images).abs().max() > 1e-3  # the new adapter is in use
    after = [ray_local.get(h.info.remote()) for h in samplers]
    for b, a in zip(before, after, strict=True):
        assert a["pid"] == b["pid"]
        assert a["version"] == 11
        assert a["fetches"] - b["fetches"] == 2  # each version once per actor, not per call
        assert a["calls"] - b["calls"] >= 2
    # the same weights in this process give the same images
    local = local_sampler.sample(requests[:2], 11, [adapters[1]])
    torch.testing.assert_close(v1.images[:2], local.images, rtol=0, atol=1e-5)

    # version 12 is broken in its last key: nothing of it may be written
    broken = {k: v.clone() for k, v in adapters[1].items()}
    last = sorted(broken)[-1]
    broken[last][..., 0] = float("nan")
    for k in sorted(broken)[:-1]:
        broken[k] = broken[k] * 2.0  # would change the images if any of it got applied
    with pytest.raises(RayTaskError, match="non-finite"):
        draw_samples(samplers, requests, 12, ray_local.put(broken), chunk=2)
    for h in samplers:
        assert ray_local.get(h.info.remote())["version"] == 11
    again = draw_samples(samplers, requests, 11, ref1, chunk=2)[0]
    torch.testing.assert_close(again.images, v1.images, rtol=0, atol=1e-5)
    final = [ray_local.get(h.info.remote()) for h in samplers]
    assert [f["fetches"] for f in final] == [a["fetches"] for a in after]


# --------------------------------------------------------------------------- run_rl


def _ranks(run_dir: Path) -> list[dict]:
    files = sorted((run_dir / "rl" / "ranks").glob("rank-*.json"))
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.slow
def test_rl_train_on_ray_two_ranks_with_different_data_end_with_identical_adapters(
    ray_local, rl_generator_dir, prompts_file, tmp_path, capsys
):
    """`medrl rl train` end to end: samplers, reward service and a TorchTrainer of two
    DeepSpeed ranks (one run covers the command, the loop and the ranks: each Ray Train
    start costs most of a minute on a 2-core machine)."""
    from generators.lora import get_adapter_state, load_adapter_into
    from generators.model import load_generator
    from medrl.cli import main
    from rl.checkpoints import adapter_digest
    from rl.records import read_rl_records

    args = [
        "rl",
        "train",
        "--config",
        "configs/demo.yaml",
        *RL_OVERRIDES,
        f"run.root={tmp_path}",
        "run.name=cli",
        f"rl.generator={rl_generator_dir}",
        f"rl.prompts_file={prompts_file}",
        "rl.iterations=2",
        "rl.learner_workers=2",
        "rl.max_staleness=1",  # iteration 1 drawn with version 0 while rank 0 trains
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    run_dir = tmp_path / "cli"
    assert f"RL adapter: {run_dir / 'rl' / 'adapter'}" in printed
    assert "final held-out reward: 0." in printed
    assert str(run_dir / "metrics.jsonl") in printed and str(run_dir / "tb") in printed

    # metrics.jsonl, TensorBoard
    records = read_rl_records(run_dir)
    steps = [r for r in records if r["stage_n"] != 0]
    assert [r["iteration"] for r in steps] == [0, 1]
    for r in steps:
        for key in (*RUN_METRICS, "eval_reward"):
            assert key in r and r[key] == r[key], key  # present, not NaN
        assert r["samples"] == r["trained_samples"] == 8  # 2 prompts x 4 images, stage 1
    assert [r["staleness"] for r in steps] == [0, 1]
    assert records[-1]["stage_n"] == 0 and records[-1]["iteration"] == 2
    assert list((run_dir / "tb" / "rl").glob("events.out.tfevents.*"))
    # gold beside the proxy for every adapter version, a grid per version, and rl/best
    for r in records:
        for key in ("eval_reward_se", "gold_combined", "gold_quality", "gold_eye_match"):
            assert key in r and r[key] == r[key], key
        assert 2.0 <= r["gold_combined"] <= 6.0
    assert "gold_combined=" in printed
    grids = sorted(p.name for p in (run_dir / "rl" / "eval").glob("version-*.png"))
    assert grids == ["version-0000.png", "version-0001.png", "version-0002.png"]
    best = json.loads((run_dir / "rl" / "best" / "adapter_config.json").read_text())
    by_version = {r["iteration"]: r["gold_combined"] for r in records}
    assert best["selected_by"] == "gold_combined"
    assert best["score"] == pytest.approx(max(by_version.values()))
    assert by_version[best["version"]] == pytest.approx(best["score"])

    # checkpoints committed, nothing temporary left
    ckpts = run_dir / "rl" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-000002"
    state = json.loads((ckpts / "step-000002" / "state.json").read_text())
    assert state["iterations_done"] == 2
    assert (ckpts / "step-000002" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert not list(ckpts.glob(".step-*"))

    # the two ranks: different samples, one adapter, and it moved
    ranks = _ranks(run_dir)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    a, b = ranks
    assert a["adapter_sha256"] == b["adapter_sha256"]  # gradients synchronised
    assert a["initial_adapter_sha256"] == b["initial_adapter_sha256"]
    assert a["adapter_sha256"] != a["initial_adapter_sha256"]  # and they did train
    assert len(a["trained_ids"]) == len(b["trained_ids"]) == 8
    assert not set(a["trained_ids"]) & set(b["trained_ids"])
    assert {i[:7] for i in a["trained_ids"]} == {"it00000", "it00001"}

    # the exported adapter is that adapter, and loads into a fresh pipeline
    assert (run_dir / "rl" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    fresh = load_generator(rl_generator_dir)
    load_adapter_into(fresh.pipe, run_dir / "rl" / "adapter")
    assert adapter_digest(get_adapter_state(fresh.unet)) == a["adapter_sha256"]


def _train(tmp_path: Path, name: str, generator: Path, prompts: Path) -> Path:
    """`medrl rl train`: one sampler, one learner rank, two iterations; the run dir."""
    from medrl.cli import main

    args = [
        "rl",
        "train",
        "--config",
        "configs/demo.yaml",
        *RL_OVERRIDES,
        f"run.root={tmp_path}",
        f"run.name={name}",
        f"rl.generator={generator}",
        f"rl.prompts_file={prompts}",
        "rl.iterations=2",
        "rl.num_samplers=1",
        "rl.max_failures=1",
        "rl.max_staleness=1",  # the restart redraws iteration 1 with version 0, as before
    ]
    assert main(args) == 0
    return tmp_path / name


@pytest.mark.slow
def test_a_learner_that_fails_is_restarted_and_resumes_to_the_same_adapter(
    ray_local, rl_generator_dir, prompts_file, fail_marker, tmp_path, capsys
):
    """rl.max_failures: Ray Train restarts the worker group of a learner rank that raised
    after iteration 0; the loop resumes from `latest` and ends with the adapter of an
    uninterrupted run (drawing one iteration ahead: the checkpoint has the adapter that
    draws iteration 1)."""
    from safetensors.torch import load_file

    from rl.records import read_rl_records

    reference = _train(tmp_path, "whole", rl_generator_dir, prompts_file)
    fail_marker.write_text("0")
    failed = _train(tmp_path, "failed", rl_generator_dir, prompts_file)
    assert not fail_marker.exists()  # the failure happened (once)
    (rank,) = _ranks(failed)
    assert rank["started_at"] == 1  # the restarted loop resumed after iteration 0
    assert rank["adapter_sha256"] == _ranks(reference)[0]["adapter_sha256"]
    weights = "rl/adapter/pytorch_lora_weights.safetensors"
    a, b = load_file(reference / weights), load_file(failed / weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # every iteration and the final evaluation recorded once
    assert [r["iteration"] for r in read_rl_records(failed)] == [0, 1, 2]


def test_rl_train_command_names_a_bad_key(capsys):
    from medrl.cli import main

    assert main(["rl", "train", "--config", "configs/demo.yaml", "rl.iterationz=2"]) == 2
    assert "rl.iterationz" in capsys.readouterr().err


def test_rl_train_command_without_a_generator_says_what_to_do(tmp_path, capsys):
    from medrl.cli import main

    missing = tmp_path / "nowhere"
    args = [
        "rl",
        "train",
        "--config",
        "configs/demo.yaml",
        f"run.root={tmp_path}",
        f"rl.generator={missing}",
        "rl.reward=spatial",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"rl.generator: no generator at {missing}" in err
    assert "medrl finetune" in err
    assert not (tmp_path / "demo").exists()  # failed before the run directory was made


# --------------------------------------------------------------------------- joining Ray


def test_driver_env_leaves_out_what_the_jobs_runtime_env_sets(monkeypatch):
    """Inside a Ray job Ray refuses a driver runtime env that sets a variable the job's
    runtime env sets too (cluster/runtime_env.yaml sets HF_HUB_OFFLINE)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from cluster.driver import env_for_job

    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    assert env_for_job(env) == env
    job = {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "4"}}}
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(job))
    assert env_for_job(env) == {"TOKENIZERS_PARALLELISM": "false"}


def test_ray_init_joins_a_job_cluster_or_starts_a_local_one_on_localhost(monkeypatch, tmp_path):
    import ray

    from cluster import driver

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **kw: calls.append(kw))
    cfg = rl_config(tmp_path)

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # a Jobs API address
    with pytest.raises(ValueError, match="medrl submit"):
        driver.ray_init(cfg)
    assert not calls

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what Ray sets inside a job
    assert driver.ray_init(cfg) is True
    assert calls[-1]["address"] == "127.0.0.1:6379" and "num_cpus" not in calls[-1]

    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv(driver.DASHBOARD_ENV, raising=False)
    assert driver.ray_init(cfg) is True
    local = calls[-1]
    assert "address" not in local
    assert local["include_dashboard"] is True and local["dashboard_host"] == "127.0.0.1"
    assert local["num_cpus"] >= cfg.rl.num_samplers + cfg.rl.learner_workers + 1
    if not torch.cuda.is_available():
        assert local["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv(driver.DASHBOARD_ENV, "0")
    driver.ray_init(cfg)
    assert calls[-1]["include_dashboard"] is False
