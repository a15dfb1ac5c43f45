"""The DDPO learner's pieces: advantages, the clipped loss, sharding, and the sign of
one update (a positive advantage raises the log-probability of its transitions)."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from rl.learner import batch_plan, group_advantages, ppo_loss
from rl.trajectories import Trajectories
from tests.rl.conftest import PROMPTS, rl_config


def test_group_advantages_per_prompt_by_hand():
    prompts = ["a", "b", "a", "a", "b", "c", "d", "d"]
    rewards = torch.tensor([1.0, 5.0, 2.0, 3.0, 5.0, 7.0, 0.0, 4.0])
    adv = group_advantages(prompts, rewards, clip=10.0)
    # a: mean 2, sample std 1 -> -1, 0, 1; b: equal rewards -> 0; c: alone -> 0;
    # d: mean 2, sample std 2 * sqrt(2) -> -+1/sqrt(2)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([-1.0, 0.0, 0.0, 1.0, 0.0, 0.0, -r, r])
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float32

    clipped = group_advantages(prompts, rewards, clip=0.5)
    torch.testing.assert_close(clipped, expected.clamp(-0.5, 0.5))
    # a prompt's group is normalised by its own rewards only: scaling another group's
    # rewards changes nothing here
    other = rewards.clone()
    other[[6, 7]] *= 100
    torch.testing.assert_close(group_advantages(prompts, other, 10.0)[:6], expected[:6])


def test_ppo_loss_clip_fraction_and_kl_by_hand():
    ratios = torch.tensor([1.5, 0.9, 1.0, 0.5])
    old = torch.tensor([-1.0, -2.0, 0.5, 0.0])
    new = old + ratios.log()
    adv = torch.tensor([1.0, -1.0, 2.0, -3.0])
    w = torch.ones(4)
    loss, stats = ppo_loss(new, old, adv, 0.2, w)
    # per row max(-A r, -A clip(r, 0.8, 1.2)):
    #   1.5, A=1  -> max(-1.5, -1.2) = -1.2      0.9, A=-1 -> max(0.9, 0.9) = 0.9
    #   1.0, A=2  -> -2                           0.5, A=-3 -> max(1.5, 2.4) = 2.4
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.9 - 2.0 + 2.4) / 4))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(2 / 4))  # 1.5 and 0.5
    kl = 0.5 * ratios.log() ** 2
    torch.testing.assert_close(stats["approx_kl"], kl.mean())

    # zero-weight rows count for nothing (the padding of a rank's shard)
    w = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss, stats = ppo_loss(new, old, adv, 0.2, w)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.9) / 2))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(1 / 2))
    torch.testing.assert_close(stats["approx_kl"], kl[:2].mean())

    # the clipped side gives no gradient, the other does
    new = new.clone().requires_grad_(True)
    loss, _ = ppo_loss(new, old, adv, 0.2, torch.ones(4))
    loss.backward()
    assert new.grad[0] == 0 and new.grad[3] == 0  # clipped: 1.5 with A > 0, 0.5 with A < 0
    torch.testing.assert_close(
        new.grad[1], torch.tensor(1.0 * 0.9 / 4)
    )  # d/dlogp = -A r / n, A = -1
    torch.testing.assert_close(new.grad[2], torch.tensor(-2.0 * 1.0 / 4))


def _batch(n: int) -> Trajectories:
    return Trajectories(
        ids=[f"s{i}" for i in range(n)],
        prompts=[f"p{i}" for i in range(n)],
        seeds=list(range(n)),
        versions=[0] * n,
        images=None,
        latents=torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1, 1).expand(n, 3, 1, 1, 1),
        log_probs=torch.arange(n, dtype=torch.float32)[:, None].expand(n, 2),
        timesteps=torch.tensor([10, 1]),
        advantages=torch.arange(n, dtype=torch.float32),
    )


@pytest.mark.parametrize(
    ("n", "world", "rows", "weights"),
    [
        (5, 2, [[0, 2, 4], [1, 3, 1]], [[1, 1, 1], [1, 1, 0]]),
        (4, 2, [[0, 2], [1, 3]], [[1, 1], [1, 1]]),
        (2, 3, [[0], [1], [0]], [[1], [1], [0]]),  # a rank with no row gets a zero-weight one
        (3, 1, [[0, 1, 2]], [[1, 1, 1]]),
    ],
)
def test_shard_pads_with_zero_weight_rows(n, world, rows, weights):
    batch = _batch(n)
    for rank in range(world):
        shard, w = batch.shard(rank, world)
        assert shard.ids == [f"s{i}" for i in rows[rank]]
        assert w.tolist() == weights[rank]
        # every tensor follows the same rows
        assert shard.advantages.tolist() == [float(i) for i in rows[rank]]
        assert shard.latents[:, 0].flatten().tolist() == [float(i) for i in rows[rank]]
        assert shard.log_probs[:, 0].tolist() == [float(i) for i in rows[rank]]
        assert torch.equal(shard.timesteps, batch.timesteps)
    # every real row is trained exactly once over the ranks
    real = [
        i for r, ws in zip(rows, weights, strict=True) for i, wt in zip(r, ws, strict=True) if wt
    ]
    assert sorted(real) == list(range(n))


def _replay_log_probs(learner, traj) -> torch.Tensor:
    """log p of every recorded transition under the learner's current adapter: (B, T)."""
    from generators.sampling import ddim_step_with_logprob

    out = []
    with torch.no_grad():
        cond, uncond = learner._embeds(list(traj.prompts))
        for j in range(len(traj.timesteps)):
            t = traj.timesteps[j].expand(len(traj))
            x = traj.latents[:, j]
            pred = learner._noise_pred(x, t, cond, uncond)
            _, logp = ddim_step_with_logprob(
                learner.scheduler,
                pred,
                t,
                x,
                learner.sampling.eta,
                prev_sample=traj.latents[:, j + 1],
            )
            out.append(logp)
    return torch.stack(out, dim=1)


def test_one_update_raises_the_log_prob_of_a_positive_advantage(rl_generator_dir, tmp_path):
    """The sign of the objective: one optimizer step with advantage +1 on one sample and
    -1 on another makes the first's recorded transitions more likely, the second's less.
    (Also: a second Learner in the same process, after another test's, works.)"""
    from rl.learner import Learner
    from rl.samplers import Sampler, SampleRequest

    torch.set_num_threads(1)
    cfg = rl_config(
        tmp_path, "rl.micro_batch=2", "rl.updates_per_epoch=1", "rl.inner_epochs=1", "rl.lr=1e-3"
    )
    sampler = Sampler(str(rl_generator_dir), cfg.lora, cfg.sampling, device="cpu")
    learners = [Learner(rl_generator_dir, cfg.lora, cfg.sampling, cfg.rl) for _ in range(2)]
    learner = learners[-1]
    adapter = learner.adapter_state()
    for k, v in learners[0].adapter_state().items():  # same seed, same initial adapter
        assert torch.equal(v, adapter[k]), k
    traj = sampler.sample(
        [SampleRequest("up", PROMPTS[0], 7), SampleRequest("down", PROMPTS[1], 8)], 0, [adapter]
    )
    before = _replay_log_probs(learner, traj)
    # on-policy: the learner recomputes what the sampler recorded
    torch.testing.assert_close(before, traj.log_probs, rtol=1e-4, atol=1e-4)

    batch = traj.for_learner(torch.tensor([1.0, -1.0]), keep=[0, 1])
    assert batch.images is None  # the learner ranks get no pixels
    stats = learner.train(batch, iteration=0, seed=0)
    assert stats["updates"] == 1.0
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] < 1e-8  # ratio 1 on-policy
    after = _replay_log_probs(learner, traj)
    change = (after - before).sum(dim=1)  # the objective sums over the trained steps
    assert change[0] > 0, f"positive advantage: log-prob change {change[0]:.3g}"
    assert change[1] < 0, f"negative advantage: log-prob change {change[1]:.3g}"
    # and the adapter moved: B was zero, now it is not
    moved = learner.adapter_state()
    assert any(not torch.equal(moved[k], adapter[k]) for k in adapter)


def test_near_deterministic_steps_are_not_trained(rl_generator_dir, tmp_path):
    """rl.min_noise_std: the last two DDIM steps of the schedule (sigma_t ~0.04, ~0.02)
    are left out; every other step (sigma_t >= 0.38 with 6 steps) is trained."""
    from rl.learner import Learner
    from rl.samplers import Sampler, SampleRequest

    torch.set_num_threads(1)
    cfg = rl_config(tmp_path, "rl.micro_batch=2")
    learner = Learner(rl_generator_dir, cfg.lora, cfg.sampling, cfg.rl)
    timesteps = learner.scheduler.timesteps
    sigma = learner.step_std(timesteps)
    assert len(sigma) == 6 and sigma[-2] < 0.05 and sigma[-1] < 0.05 and sigma[:-2].min() > 0.3
    assert learner.trained_steps(timesteps).tolist() == [0, 1, 2, 3]

    # a poisoned x_5 (only the last two transitions read it) changes nothing trained
    sampler = Sampler(str(rl_generator_dir), cfg.lora, cfg.sampling, device="cpu")
    adapter = learner.adapter_state()
    traj = sampler.sample([SampleRequest(f"s{i}", PROMPTS[i], i) for i in range(2)], 0, [adapter])
    latents = traj.latents.clone()
    latents[:, 5:] = float("nan")
    batch = replace(traj, latents=latents).for_learner(torch.tensor([1.0, -1.0]), keep=[0, 1])
    learner.train(batch, iteration=0, seed=0)
    after = learner.adapter_state()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], adapter[k]) for k in adapter)

    with pytest.raises(ValueError, match="min_noise_std"):
        Learner(rl_generator_dir, cfg.lora, cfg.sampling, replace(cfg.rl, min_noise_std=1.0))


@pytest.mark.parametrize(
    ("samples", "world", "micro", "updates", "expect"),
    [
        # (per_rank, padded, micro_batches, micro_per_update, updates_per_epoch)
        (32, 1, 8, 4, (32, 0, 4, 1, 4)),  # the demo: four steps of one micro-batch each
        (32, 2, 8, 4, (16, 0, 2, 1, 2)),  # two ranks: two micro-batches each, two steps
        (13, 2, 4, 4, (7, 1, 2, 1, 2)),  # stage 2 kept 13: one zero-weight row pads rank 1
        (40, 1, 4, 3, (40, 0, 10, 4, 3)),  # 10 micro-batches in steps of 4, 4, 2
        (3, 4, 8, 4, (1, 1, 1, 1, 1)),  # fewer samples than ranks
        (0, 2, 8, 4, (0, 0, 0, 1, 0)),  # nothing passed the gate: no step
    ],
)
def test_batch_plan_states_the_arithmetic_and_the_shards_match_it(
    samples, world, micro, updates, expect
):
    # the rl.* keys batch_plan reads
    cfg = SimpleNamespace(
        micro_batch=micro, updates_per_epoch=updates, inner_epochs=2, timestep_fraction=1.0
    )
    plan = batch_plan(samples, world, cfg, eligible_steps=10)
    got = (plan.per_rank, plan.padded, plan.micro_batches, plan.micro_per_update)
    assert (*got, plan.updates_per_epoch) == expect
    assert plan.optimizer_steps == 2 * plan.updates_per_epoch
    assert plan.steps_per_sample == 10 and str(plan.per_rank) in plan.describe()
    for rank in range(world):  # the shards the learner trains have exactly per_rank rows
        if samples:
            assert len(_batch(samples).shard(rank, world)[0]) == plan.per_rank


def test_several_steps_in_one_unet_call_give_the_same_update(rl_generator_dir, tmp_path):
    """rl.steps_per_forward: the DDIM steps of a micro-batch trained in one UNet call give
    the gradient of one call per step (the gradient of a sum is the sum of the gradients),
    to float summation order: within 1e-6 of the largest gradient element (measured: 4e-7);
    with the KL term, over two iterations (the second off-policy), statistics within 1e-4.
    The adapters then agree to 1e-5 (a step is 1e-3): Adam divides by sqrt(v), so an
    element with a near-zero gradient moves on float noise, and so they are not equal."""
    from generators.lora import lora_parameters
    from rl.learner import Learner
    from rl.samplers import Sampler, SampleRequest

    torch.set_num_threads(1)
    keys = ("rl.micro_batch=2", "rl.updates_per_epoch=1", "rl.lr=1e-3", "rl.kl_weight=0.1")
    learners, grads, stats = [], [], []
    for k in (1, 3):  # 4 trained steps: calls of 3 + 1 steps against 4 calls of 1
        cfg = rl_config(tmp_path, *keys, "rl.zero_stage=0", f"rl.steps_per_forward={k}")
        learner = Learner(rl_generator_dir, cfg.lora, cfg.sampling, cfg.rl)
        seen: list[torch.Tensor] = []
        grads.append(seen)
        step, params = learner.engine.step, lora_parameters(learner.engine.module)

        def capture(step=step, params=params, seen=seen):  # the gradient before clipping
            seen.append(torch.cat([p.grad.flatten().clone() for p in params]))
            step()

        learner.engine.step = capture
        learners.append(learner)
    sampler = Sampler(str(rl_generator_dir), cfg.lora, cfg.sampling, device="cpu")
    adapter = learners[0].adapter_state()
    traj = sampler.sample([SampleRequest(f"s{i}", PROMPTS[i], i) for i in range(4)], 0, [adapter])
    batch = traj.for_learner(torch.tensor([1.0, -1.0, 0.5, -0.5]), keep=[0, 1, 2, 3])
    for i in range(2):
        stats.append([learner.train(batch, iteration=i, seed=0) for learner in learners])
        if i == 0:
            one, packed = (learner.adapter_state() for learner in learners)
    scale = float(grads[0][0].abs().max())
    assert scale > 0
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=1e-6 * scale)
    for k in one:
        torch.testing.assert_close(packed[k], one[k], rtol=0, atol=1e-5, msg=k)
    for a, b in stats:
        assert a.keys() == b.keys() and "kl_to_base" in a
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-9), k
    assert stats[1][0]["approx_kl"] > 0  # the second iteration is off-policy
