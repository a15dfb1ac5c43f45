"""``rl.algorithm=feature_align`` (rl/learners/feature_align.py) and the alignment term it
shares with ``medrl finetune`` (generators/feature_align.py): the loss by hand, the
features of the conditional half, the gradient's reach, and one iteration's effect on
held-out noise. Its resume is test_learners.py's ``test_checkpoints_resume_like_ddpo``."""

from __future__ import annotations

import math

import pytest
import torch

from tests.rl.conftest import PROMPTS, rl_config


def _drawn_batch(learner, cfg, generator_dir):
    """Four samples (two per prompt, fixed seeds) and the adapter they were drawn with."""
    from rl.samplers import Sampler, SampleRequest

    sampler = Sampler(str(generator_dir), cfg.lora, cfg.sampling, device="cpu")
    requests = [SampleRequest(f"s{i}", PROMPTS[i // 2], 100 + i) for i in range(4)]
    return sampler.sample(requests, 0, [learner.adapter_state()])


def test_alignment_loss_by_hand():
    """-cos(W_p e, d) per row, weighted mean: W_p = I, rows at 0 and 45 degrees (cos 1 and
    1/sqrt 2), weights 1 and 3; its gradient reaches W_p."""
    from generators.feature_align import AlignHead, alignment_loss

    head = AlignHead(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    expert = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    unet = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    loss, cos = alignment_loss(head, expert, unet, torch.tensor([1.0, 3.0]))
    assert cos.tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])
    assert loss.item() == pytest.approx(-(1.0 + 3 / math.sqrt(2)) / 4)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_down_features_are_the_conditional_half_of_a_guided_call(tiny_gen):
    """In a call on [uncond; cond] the hook's last rows are the features a call on the cond
    rows alone gives (the mid block's input, pooled), not the uncond rows'."""
    from generators.feature_align import DownFeatures, unet_feature_dim

    unet = tiny_gen.unet.eval()
    down = DownFeatures(unet)
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    cond = tiny_gen.encode_prompts(["left eye", "right eye"])
    uncond = tiny_gen.encode_prompts([""]).expand(2, -1, -1)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=cond)
        alone = down.take(2)
        unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]))
        both = down.pooled.clone()
        guided = down.take(2)
    down.remove()
    assert alone.shape == (2, unet_feature_dim(unet))
    torch.testing.assert_close(guided, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both[:2], alone, atol=1e-3)  # the uncond half differs
    with pytest.raises(RuntimeError, match="no UNet forward"):
        down.take(2)


def _held_out_alignment(learner, latents, prompts, draws=4):
    """Mean L_align over ``draws`` fixed latent and pixel noises (never the training draws)."""
    from generators.training_common import noise_latents

    cond, uncond = learner._embeds(list(prompts))
    losses = []
    for s in range(draws):
        noised = noise_latents(learner.scheduler, latents, torch.Generator().manual_seed(500 + s))
        with torch.no_grad():
            learner._noise_pred(noised.noisy, noised.t, cond, uncond)
            feats = learner.down.take(len(latents))
            g = torch.Generator().manual_seed(900 + s)
            losses.append(learner.alignment(noised, feats, g=g)[0])
    return float(torch.stack(losses).mean())


def test_gradient_reaches_the_head_and_the_lora(rl_generator_dir, tiny_selector_dir, tmp_path):
    """W_p and the LoRA (B, the only part with a gradient while B = 0) get a gradient from
    L_align alone; the LoRA's is through the UNet's down-block features."""
    from generators.training_common import noise_latents
    from rl.learners import make_learner
    from rl.learners.feature_align import HEAD, FeatureAlignLearner

    torch.set_num_threads(1)
    cfg = rl_config(
        tmp_path, "rl.algorithm=feature_align", f"rl.align_expert={tiny_selector_dir}",
        "rl.real_share=0",
    )  # fmt: skip
    learner = make_learner(cfg, rl_generator_dir, {})
    assert isinstance(learner, FeatureAlignLearner)
    trained = {n for n, p in learner.engine.module.named_parameters() if p.requires_grad}
    assert f"{HEAD}.weight" in trained
    assert not any(HEAD in k for k in learner.adapter_state())  # not exported
    unet = learner.gen.unet.config
    shape = (2, unet.in_channels, unet.sample_size, unet.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    noised = noise_latents(learner.scheduler, latents, torch.Generator().manual_seed(1))
    cond, uncond = learner._embeds(["left eye", "right eye"])
    learner._noise_pred(noised.noisy, noised.t, cond, uncond)
    loss, _ = learner.alignment(noised, learner.down.take(2))
    loss.backward()
    grads = {n: p.grad for n, p in learner.engine.module.named_parameters() if p.requires_grad}
    assert grads[f"{HEAD}.weight"].abs().sum() > 0
    lora_b = [g for n, g in grads.items() if "lora_B" in n and g is not None]
    assert lora_b and sum(float(g.abs().sum()) for g in lora_b) > 0


def test_one_iteration_raises_the_alignment_on_held_out_noise(
    rl_generator_dir, tiny_selector_dir, tmp_path
):
    """One feature_align iteration on two kept samples lowers L_align on noise it never
    trained on (latent and pixel draws) by more than MARGIN, and reports it (measured: 0.054
    before, -0.772 after; with rl.align_weight=0, 0.115 after: the fault this catches)."""
    from rl.learners import make_learner

    MARGIN = 0.3
    torch.set_num_threads(1)
    cfg = rl_config(
        tmp_path, "rl.algorithm=feature_align", f"rl.align_expert={tiny_selector_dir}",
        "rl.real_share=0", "rl.micro_batch=2", "rl.updates_per_epoch=4", "rl.lr=1e-2",
    )  # fmt: skip
    learner = make_learner(cfg, rl_generator_dir, {})
    traj = _drawn_batch(learner, cfg, rl_generator_dir)
    x0 = traj.latents[:, -1]
    before = _held_out_alignment(learner, x0, traj.prompts)
    stats = learner.train(traj.for_learner(torch.zeros(4), [0, 2]), iteration=0, seed=0)
    after = _held_out_alignment(learner, x0, traj.prompts)
    assert stats["optimizer_steps_iteration"] == 4 and "align_loss" in stats
    assert after < before - MARGIN, (before, after)
