"""The reward service: per-sample errors by id, the combined reward, pixel rewards, Ray, Serve."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from rewards.http import RewardHTTPService, check_host, decode_image, encode_image, serve_rewards
from rewards.models import AlignmentPolicy, QualitySelector, RewardModels
from rewards.scorers import (
    BatchedReward,
    BrightnessReward,
    RewardModelScorer,
    SpatialReward,
    build_reward,
    rewards_config,
)
from rewards.scores import Reward, RewardScore, ScoreResult
from rewards.service import RewardService, score_with_services, start_reward_services
from tests.rewards.conftest import tiny_rewards_cfg

PROMPTS = [
    "colour fundus photograph, left eye, no diabetic retinopathy",
    "colour fundus photograph, right eye, mild non-proliferative diabetic retinopathy",
    "colour fundus photograph, left eye, proliferative diabetic retinopathy",
    "right eye",
    "colour fundus photograph, right eye, moderate diabetic retinopathy with haemorrhages",
    "left eye, glaucoma",
]


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A `medrl rewards train`-style output directory with tiny random models."""
    cfg = tiny_rewards_cfg()
    out = tmp_path_factory.mktemp("rewards")
    torch.manual_seed(0)
    meta = {"threshold": 0.9, "reward_weights": {"quality": 0.1, "alignment": 0.9}}
    QualitySelector.from_config(cfg).save_pretrained(out / "selector", **meta)
    AlignmentPolicy.from_config(cfg).save_pretrained(out / "alignment", **meta)
    return out


def assert_scores_close(a: RewardScore, b: RewardScore, atol: float = 1e-5) -> None:
    for key in ("reward", "quality", "alignment"):
        x, y = getattr(a, key), getattr(b, key)
        assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= atol, (key, x, y)
    assert a.passed == b.passed


# --------------------------------------------------------------------------- bad input


def test_bad_samples_get_errors_naming_their_ids_and_the_rest_score_as_alone(models_dir):
    scorer = RewardModelScorer.from_config(models_dir, tiny_rewards_cfg(service_batch_size=2))
    x = images(6)
    batch: list = list(x)
    batch[1] = torch.zeros(3, 4, 4)  # wrong shape
    batch[3] = x[3].clone()
    batch[3][1, 5, 7] = float("nan")  # NaN pixel
    prompts = list(PROMPTS)
    prompts[4] = "   "  # empty after strip
    ids = ["s0", "bad-shape", "s2", "has-nan", "no-prompt", "s5"]
    result = scorer.score(batch, prompts, ids)

    assert set(result.errors) == {"bad-shape", "has-nan", "no-prompt"}
    assert "'bad-shape'" in result.errors["bad-shape"] and "(3, 4, 4)" in result.errors["bad-shape"]
    assert "'has-nan'" in result.errors["has-nan"] and "NaN" in result.errors["has-nan"]
    assert "'no-prompt'" in result.errors["no-prompt"]
    assert "empty prompt" in result.errors["no-prompt"]
    assert set(result.scores) == {"s0", "s2", "s5"}
    for i, sid in ((0, "s0"), (2, "s2"), (5, "s5")):  # batch invariance
        alone = scorer.score(x[i : i + 1], [PROMPTS[i]], [sid])
        assert_scores_close(result.scores[sid], alone.scores[sid])


def test_images_of_different_sizes_in_one_call_score_as_alone(models_dir):
    scorer = RewardModelScorer.from_config(models_dir, tiny_rewards_cfg())
    mixed = [images(1, 32, seed=1)[0], images(1, 48, seed=2)[0], torch.rand(3, 20, 36) * 2 - 1]
    ids = ["small", "large", "wide"]
    result = scorer.score(mixed, PROMPTS[:3], ids)
    assert not result.errors
    for i, sid in enumerate(ids):
        alone = scorer.score([mixed[i]], [PROMPTS[i]], [sid])
        assert_scores_close(result.scores[sid], alone.scores[sid])


def test_batch_checks_duplicates_range_and_call_shape():
    reward = BrightnessReward()
    x = images(4)
    result = reward.score(x, PROMPTS[:4], ["a", "dup", "b", "dup"])
    assert set(result.scores) == {"a", "b"} and set(result.errors) == {"dup"}
    assert "2 times" in result.errors["dup"]

    far = x.clone()
    far[2] = (far[2] + 1) * 127.5  # a [0, 255] image: an error, not a silent clamp
    near = x.clone()
    near[0] = 1.2  # slightly out of range: clamped
    result = reward.score(torch.cat([far[2:3], near[0:1]]), PROMPTS[:2], ["far", "near"])
    assert "'far'" in result.errors["far"] and "[-1, 1]" in result.errors["far"]
    assert result.scores["near"].reward == pytest.approx(1.0)

    result = reward.score(x.numpy(), PROMPTS[:4], ["n0", "n1", "n2", "n3"])  # ndarray batch
    assert len(result.scores) == 4
    result = reward.score([np.zeros((32, 32, 3), np.float32), x[0]], PROMPTS[:2], ["hwc", "ok"])
    assert set(result.errors) == {"hwc"} and "(32, 32, 3)" in result.errors["hwc"]

    with pytest.raises(ValueError, match="3 images but 4 ids"):
        reward.score(x[:3], PROMPTS[:4], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="3 prompts but 4 ids"):
        reward.score(x, PROMPTS[:3], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="position 1"):
        reward.score(x[:2], PROMPTS[:2], ["a", ""])
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        reward.score(x[0], PROMPTS[:1], ["a"])  # one image, not a batch


def test_a_failing_batch_is_scored_one_by_one_and_only_the_culprit_fails():
    class Fragile(BatchedReward):
        name = "fragile"
        batch_size = 8

        def score_images(self, images, prompts):
            if any(float(x.mean()) > 0.9 for x in images):
                raise RuntimeError("cannot score a white image")
            return [RewardScore(0.5, 0.5, float("nan"), True) for _ in images]

    x = images(4)
    x[2] = 1.0
    service = RewardService(Fragile())  # any reward plugs in
    result = service.score(x, PROMPTS[:4], ["a", "b", "white", "c"])
    assert set(result.scores) == {"a", "b", "c"}
    assert "'white'" in result.errors["white"] and "cannot score" in result.errors["white"]
    with pytest.raises(RuntimeError, match="white"):  # nothing scores: the reward is broken
        service.score(torch.ones(2, 3, 16, 16), PROMPTS[:2], ["w1", "w2"])


# --------------------------------------------------------------------------- the reward


def test_combined_reward_and_pass_use_weights_and_threshold_from_config(models_dir):
    x = images(6, seed=3)
    ids = [f"id{i}" for i in range(6)]
    reference = RewardModels.load(models_dir).score(x, PROMPTS)  # stored 0.1 / 0.9 / 0.9
    quality = reference["quality"].tolist()
    threshold = sorted(quality)[3]  # some pass, some do not
    cfg = tiny_rewards_cfg(quality_weight=3.0, alignment_weight=1.0, threshold=threshold)
    reward = build_reward(str(models_dir), cfg)
    assert isinstance(reward, RewardModelScorer) and isinstance(reward, Reward)
    result = reward.score(x, PROMPTS, ids)
    assert not result.errors
    passed = []
    for i, sid in enumerate(ids):
        s = result.scores[sid]
        q, a = reference["quality"][i].item(), reference["alignment"][i].item()
        assert s.quality == pytest.approx(q, abs=1e-6)
        assert s.alignment == pytest.approx(a, abs=1e-6)
        assert s.reward == pytest.approx((3.0 * q + 1.0 * a) / 4.0, abs=1e-6)
        assert s.passed == (s.quality >= threshold)
        passed.append(s.passed)
    assert any(passed) and not all(passed)


def test_brightness_and_spatial_rewards_on_hand_made_images():
    white, black, grey = torch.ones(3, 16, 16), -torch.ones(3, 16, 16), torch.zeros(3, 16, 16)
    left_white = -torch.ones(3, 16, 16)
    left_white[..., :8] = 1.0
    odd = -torch.ones(3, 8, 9)  # odd width: the middle column counts for neither half
    odd[..., :4] = 1.0
    odd[..., 4] = 0.3
    imgs = [white, black, grey, left_white, left_white.flip(-1), odd]
    ids = ["white", "black", "grey", "left", "right", "odd"]
    prompts = ["p"] * 6

    bright = BrightnessReward().score(imgs, prompts, ids).scores
    assert [bright[i].reward for i in ids[:5]] == pytest.approx([1.0, 0.0, 0.5, 0.5, 0.5])
    assert all(
        math.isnan(s.alignment) and s.passed and s.quality == s.reward for s in bright.values()
    )

    spatial = SpatialReward().score(imgs, prompts, ids).scores
    assert [spatial[i].reward for i in ids] == pytest.approx([0.5, 0.5, 0.5, 1.0, 0.0, 1.0])

    gated = BrightnessReward(threshold=0.6).score([white, black], ["p", "p"], ["w", "b"])
    assert gated.scores["w"].passed and not gated.scores["b"].passed
    assert build_reward("spatial:0.75").score([left_white], ["p"], ["l"]).scores["l"].passed


def test_reward_specs_and_config_dicts(models_dir):
    cfg = tiny_rewards_cfg(threshold=0.3)
    assert isinstance(build_reward("brightness", cfg), BrightnessReward)
    assert (
        build_reward("brightness", cfg).threshold is None
    )  # the selector's threshold is not applied
    assert build_reward("Spatial:0.4").threshold == pytest.approx(0.4)
    assert build_reward(f"models:{models_dir}", cfg).threshold == pytest.approx(0.3)
    for bad in ("nope", "brightness:2", "models:/no/such/dir", ""):
        with pytest.raises(ValueError, match="reward spec"):
            build_reward(bad, cfg)
    with pytest.raises(FileNotFoundError, match="selector"):
        build_reward(str(models_dir / "selector"), cfg)  # a directory, not the models' parent

    built = rewards_config(
        {"threshold": 0.4, "vision": {"image_size": 32}, "fusion_hidden": [8, 4]}
    )
    assert built.threshold == 0.4 and built.vision.image_size == 32
    assert built.fusion_hidden == (8, 4)
    with pytest.raises(ValueError, match="rewards.vision.nope"):
        rewards_config({"vision": {"nope": 1}})


def test_score_json_round_trips_pngs_and_names_bad_images():
    service = RewardHTTPService("brightness", {"service_batch_size": 4})
    x = images(3)
    body = {
        "ids": ["a", "b", "c"],
        "prompts": ["p", "q", "r"],
        "images": [encode_image(x[0]), "not base64!", encode_image(x[2])],
    }
    out = service.score_json(body)
    json.dumps(out, allow_nan=False)  # NaN alignment is null: valid JSON
    assert set(out["scores"]) == {"a", "c"} and "'b'" in out["errors"]["b"]
    expected = BrightnessReward().score([decode_image(encode_image(x[0]))], ["p"], ["a"])
    assert out["scores"]["a"]["reward"] == pytest.approx(expected.scores["a"].reward)
    assert out["scores"]["a"]["alignment"] is None
    assert ScoreResult.from_json(out).scores["a"].passed
    with pytest.raises(ValueError, match="'images'"):
        service.score_json({"ids": [], "prompts": []})
    assert service.info()["scored"] == 2 and service.info()["errors"] == 1


def test_public_hosts_are_refused_unless_allowed(monkeypatch):
    with pytest.raises(ValueError, match="0.0.0.0"):
        serve_rewards("brightness", None, host="0.0.0.0", port=8000)
    check_host("127.0.0.1")
    check_host("10.1.2.3", allow_public=True)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")  # would bind all interfaces
    with pytest.raises(ValueError, match="HA_PROXY"):
        check_host("127.0.0.1")


def test_cli_serve_refuses_a_public_host(capsys):
    from medrl.cli import main

    assert main(["rewards", "serve", "--reward", "brightness", "--host", "0.0.0.0"]) == 2
    assert "--allow-public" in capsys.readouterr().err


# --------------------------------------------------------------------------- Ray, Serve


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_actors_score_by_id_with_shuffled_ids(ray_local, models_dir):
    cfg = tiny_rewards_cfg()
    handles = start_reward_services(str(models_dir), cfg, replicas=2, num_cpus=0.5)
    try:
        n = 7
        x = images(n, seed=5)
        ids = [f"sample-{i}" for i in range(n)]
        order = list(range(n))
        random.Random(0).shuffle(order)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        result = score_with_services(
            handles, x[order], [prompts[i] for i in order], [ids[i] for i in order], batch_size=3
        )
        assert not result.errors and set(result.scores) == set(ids)
        local = RewardModelScorer.from_config(models_dir, cfg).score(x, prompts, ids)
        for sid in ids:
            assert_scores_close(result.scores[sid], local.scores[sid])
        # a duplicate split over two calls is still caught
        dup = score_with_services(handles, x[:4], prompts[:4], ["a", "b", "c", "a"], batch_size=2)
        assert set(dup.errors) == {"a"} and set(dup.scores) == {"b", "c"}
        infos = ray_local.get([h.info.remote() for h in handles])
        assert all(i["calls"] >= 1 for i in infos)  # both replicas got work
    finally:
        for h in handles:
            ray_local.kill(h)


# --------------------------------------------------------------------------- Ray faults


def _faulty_reward(marker: str, fault: str, always: bool = False) -> Reward:
    """Brightness, but its first call of all (every call if ``always``) hangs (``fault``
    "hang"), ends its process ("exit") or raises Ray's ``OutOfMemoryError`` ("oom", as
    a caller sees a worker killed by Ray's memory monitor) first; that call creates
    ``marker``. Made here, the class travels to Ray by value."""

    class Faulty(BrightnessReward):
        def score(self, images, prompts, ids):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                first = True
            except FileExistsError:
                first = False
            if first or always:
                if fault == "exit":
                    os._exit(1)
                if fault == "oom":
                    from ray.exceptions import OutOfMemoryError

                    raise OutOfMemoryError("worker killed: the node is running low on memory")
                time.sleep(3600)
            return super().score(images, prompts, ids)

    return Faulty()


def _check_scored_once(ray, handles, result, x, prompts, ids):
    """Every id scored, as the reward scores it alone; the live replicas scored each once."""
    assert not result.errors and set(result.scores) == set(ids)
    alone = BrightnessReward().score(x, prompts, ids)
    for sid in ids:
        assert result.scores[sid].reward == pytest.approx(alone.scores[sid].reward, abs=1e-6)
    infos = ray.get([h.info.remote() for h in handles], timeout=60)
    assert sum(i["scored"] for i in infos) == len(ids)
    return [i["pid"] for i in infos]


def _warnings(caplog, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


def test_a_hung_reward_replica_is_replaced_and_its_batches_scored_once(ray_local, tmp_path, caplog):
    reward = _faulty_reward(str(tmp_path / "first-call"), "hang")
    handles = start_reward_services(reward, {"score_timeout_s": 3}, replicas=2, num_cpus=0.5)
    try:
        before = [i["pid"] for i in ray_local.get([h.info.remote() for h in handles])]
        x, ids = images(8, seed=3), [f"h{i}" for i in range(8)]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="rewards.service"):
            result = score_with_services(handles, x, prompts, ids, batch_size=2)
        assert time.monotonic() - started < 60
        after = _check_scored_once(ray_local, handles, result, x, prompts, ids)
        assert len(set(before) & set(after)) == 1  # the hung replica is a new process
        (warning,) = _warnings(caplog, "did not answer within 3 s (rewards.score_timeout_s)")
        assert "replacing it and scoring its 4 sample(s) again" in warning
    finally:
        for h in handles:
            ray_local.kill(h)


@pytest.mark.parametrize("how", ["ray.kill", "exit", "oom"])
def test_a_reward_replica_killed_mid_call_is_replaced_and_its_batch_scored_once(
    ray_local, tmp_path, caplog, how
):
    """ray.kill (no restart): the call fails and ScoringCalls replaces the replica; the
    process exiting: Ray restarts the actor and retries the call itself; the call failing
    with Ray's ``OutOfMemoryError`` (simulated: raised by the reward, not a real kill by
    Ray's memory monitor, see tests/rl/test_ray_faults.py): replaced as if it died."""
    marker = tmp_path / "first-call"
    reward = _faulty_reward(str(marker), {"ray.kill": "hang"}.get(how, how))
    handles = start_reward_services(reward, {}, replicas=1, num_cpus=0.5)

    def kill_once_busy():
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        ray_local.kill(handles[0])

    killer = threading.Thread(target=kill_once_busy, daemon=True)
    try:
        if how == "ray.kill":
            killer.start()
        x, ids = images(4, seed=4), ["k0", "k1", "k2", "k3"]
        with caplog.at_level(logging.WARNING, logger="rewards.service"):
            result = score_with_services(handles, x, PROMPTS[:4], ids, batch_size=2)
        _check_scored_once(ray_local, handles, result, x, PROMPTS[:4], ids)
        died = _warnings(caplog, "died (")
        if how != "exit":  # the call it was running counts the failure
            assert len(died) == 1 and "(samples k0..k1: failure 1 of 3)" in died[0]
            assert how != "oom" or "OutOfMemoryError" in died[0]
        else:
            assert not died
    finally:
        for h in handles:
            ray_local.kill(h)


def test_a_reward_that_always_hangs_ends_with_an_error_naming_its_samples(
    ray_local, tmp_path, caplog
):
    reward = _faulty_reward(str(tmp_path / "first-call"), "hang", always=True)
    handles = start_reward_services(reward, {"score_timeout_s": 2}, replicas=1, num_cpus=0.5)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="rewards.service"):
            with pytest.raises(RuntimeError) as err:
                score_with_services(handles, images(2), PROMPTS[:2], ["c0", "c1"])
        assert time.monotonic() - started < 60
        assert str(err.value).startswith(
            "reward scoring: samples c0..c1 failed 3 times; last: reward replica 0 (actor "
        )
        assert str(err.value).endswith("did not answer within 2 s (rewards.score_timeout_s)")
        assert len(_warnings(caplog, "(samples c0..c1: failure")) == 2
    finally:
        for h in handles:
            ray_local.kill(h)


@pytest.mark.slow
def test_serve_http_endpoint_on_localhost(ray_local, models_dir):
    serve = pytest.importorskip("ray.serve", reason="needs ray[serve] (fastapi, starlette)")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_rewards_cfg()
    url = serve_rewards(str(models_dir), cfg, port=port, replicas=1, num_cpus=0.5)
    try:
        assert url == f"http://127.0.0.1:{port}/score"
        x = images(3, seed=7)
        body = {
            "ids": ["x0", "x1", "x2"],
            "prompts": [PROMPTS[0], "", PROMPTS[2]],
            "images": [encode_image(img) for img in x],
        }
        req = urllib.request.Request(
            url, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        assert set(out["scores"]) == {"x0", "x2"} and "'x1'" in out["errors"]["x1"]
        pngs = [decode_image(body["images"][i]) for i in (0, 2)]
        local = RewardModelScorer.from_config(models_dir, cfg).score(
            pngs, [PROMPTS[0], PROMPTS[2]], ["x0", "x2"]
        )
        for sid in ("x0", "x2"):
            assert_scores_close(ScoreResult.from_json(out).scores[sid], local.scores[sid])
        bad = urllib.request.Request(url, b'{"ids": []}', {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=60)
        assert err.value.code == 400 and "prompts" in err.value.read().decode()
    finally:
        serve.shutdown()
