"""DDIM sampling: log-probs against an independent float64 computation, seeds, replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from generators.sampling import ddim_step_with_logprob, guided_noise_pred, sample

PROMPTS = ["colour fundus photograph, left eye", "colour fundus photograph, right eye, exudates"]


def _independent_alphas_cumprod(cfg) -> np.ndarray:
    """scaled_linear betas written out by hand (not taken from the scheduler)."""
    assert cfg.beta_schedule == "scaled_linear"
    betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps) ** 2
    return np.cumprod(1.0 - betas)


def test_logprob_matches_independent_ddpo_formula(tiny_gen, tiny_cfg):
    steps, eta, guidance = 6, 0.8, 4.0
    out = sample(tiny_gen, PROMPTS, [3, 4], num_steps=steps, eta=eta, guidance_scale=guidance)
    assert out.latents.shape == (2, steps + 1, 4, 16, 16)
    assert out.log_probs.shape == (2, steps)
    # DDIM "leading" timesteps with steps_offset=1, by hand
    T = tiny_cfg.model.scheduler.num_train_timesteps
    expected_t = (np.arange(steps)[::-1] * (T // steps) + 1).tolist()
    assert out.timesteps.tolist() == expected_t

    acp = _independent_alphas_cumprod(tiny_cfg.model.scheduler)
    gen = tiny_gen
    cond = gen.encode_prompts(PROMPTS)
    uncond = gen.encode_prompts([""] * 2)
    for i, t in enumerate(expected_t):
        x_t = out.latents[:, i]
        with torch.no_grad():
            e_u = gen.unet(x_t, t, encoder_hidden_states=uncond).sample
            e_c = gen.unet(x_t, t, encoder_hidden_states=cond).sample
        eps = (e_u + guidance * (e_c - e_u)).double().numpy()
        x_t = x_t.double().numpy()
        prev_t = max(t - T // steps, 0)
        a_t, a_p = acp[t], acp[prev_t]
        x0 = (x_t - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        sigma = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        mean = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - sigma**2) * eps
        x_prev = out.latents[:, i + 1].double().numpy()
        expected = norm.logpdf(x_prev, loc=mean, scale=sigma).reshape(2, -1).mean(axis=1)
        np.testing.assert_allclose(out.log_probs[:, i].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_replay_recomputes_the_same_logprob(tiny_gen):
    """The learner scores recorded transitions; it must get what the sampler recorded."""
    out = sample(tiny_gen, PROMPTS, [0, 1], num_steps=4, eta=1.0, guidance_scale=3.0)
    cond, uncond = tiny_gen.encode_prompts(PROMPTS), tiny_gen.encode_prompts(["", ""])
    sched = tiny_gen.scheduler
    for i, t in enumerate(out.timesteps):
        with torch.no_grad():
            eps = guided_noise_pred(tiny_gen, out.latents[:, i], t, cond, uncond, 3.0)
        # per-sample timesteps, as the learner uses them
        _, logp = ddim_step_with_logprob(
            sched, eps, t.repeat(2), out.latents[:, i], 1.0, prev_sample=out.latents[:, i + 1]
        )
        torch.testing.assert_close(logp, out.log_probs[:, i], rtol=1e-4, atol=1e-4)


def test_logprob_prefers_the_mean(tiny_gen):
    """A draw at the mean has a higher log-prob than the recorded noisy draw."""
    out = sample(tiny_gen, PROMPTS[:1], [0], num_steps=3, eta=1.0, guidance_scale=1.0)
    sched = tiny_gen.scheduler
    t = out.timesteps[0]
    with torch.no_grad():
        eps = tiny_gen.unet(out.latents[:, 0], t, tiny_gen.encode_prompts(PROMPTS[:1])).sample
    mean, _ = ddim_step_with_logprob(
        sched, eps, t, out.latents[:, 0], 1.0, noise=torch.zeros_like(eps)
    )
    _, lp_mean = ddim_step_with_logprob(sched, eps, t, out.latents[:, 0], 1.0, prev_sample=mean)
    assert lp_mean.item() > out.log_probs[0, 0].item()


def test_same_seed_same_image_whatever_the_batch(tiny_gen):
    a = sample(tiny_gen, PROMPTS + PROMPTS, [5, 6, 7, 8], num_steps=3, batch_size=4)
    b = sample(tiny_gen, [PROMPTS[1]], [8], num_steps=3)
    c = sample(tiny_gen, PROMPTS + PROMPTS, [5, 6, 7, 8], num_steps=3, batch_size=3)
    torch.testing.assert_close(b.images[0], a.images[3], rtol=0, atol=1e-4)
    torch.testing.assert_close(c.images, a.images, rtol=0, atol=1e-4)
    torch.testing.assert_close(c.log_probs, a.log_probs, rtol=1e-4, atol=1e-4)
    # and a different seed gives a different image
    assert (a.images[1] - a.images[3]).abs().max() > 1e-3


def test_bad_arguments_are_refused(tiny_gen):
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        sample(tiny_gen, PROMPTS, [1])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample(tiny_gen, ["ok", "  "], [1, 2])
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample(tiny_gen, PROMPTS[:1], [1], eta=-0.5)


def test_eta_zero_is_deterministic_ddim_without_logprob(tiny_gen):
    a = sample(tiny_gen, PROMPTS[:1], [1], num_steps=3, eta=0.0)
    b = sample(tiny_gen, PROMPTS[:1], [2], num_steps=3, eta=0.0)
    assert torch.isnan(a.log_probs).all()
    # only the initial noise differs between seeds; each step is the DDIM mean
    assert (a.images - b.images).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no density"):
        ddim_step_with_logprob(
            tiny_gen.scheduler,
            a.latents[:, 0],
            a.timesteps[0],
            a.latents[:, 0],
            0.0,
            prev_sample=a.latents[:, 1],
        )


def test_demo_tokenizer_knows_the_prompt_words(tiny_cfg, tiny_gen):
    """The bundled vocabulary really loads: prompt words are not [UNK], so text conditions."""
    from generators.model import build_tokenizer

    tok = build_tokenizer(tiny_cfg.model.text_encoder)
    assert tok.tokenize("Left eye, moderate diabetic retinopathy") == [
        "left",
        "eye",
        ",",
        "moderate",
        "diabetic",
        "retinopathy",
    ]
    assert tok.unk_token_id not in tok("right eye, exudates").input_ids
    left, right = tiny_gen.encode_prompts(["left eye", "right eye"])
    assert not torch.allclose(left, right)


def test_text_time_embedding_is_a_second_text_pathway(tiny_cfg):
    """model.unet.text_time_embedding: with every cross-attention's values zeroed the text
    still reaches the UNet, through the pooled embedding added to the time embedding."""
    from dataclasses import replace

    from generators.model import build_generator

    model = replace(tiny_cfg.model, unet=replace(tiny_cfg.model.unet, text_time_embedding=True))
    gen = build_generator(model, seed=0)
    assert gen.unet.config.addition_embed_type == "text"
    with torch.no_grad():
        for name, p in gen.unet.named_parameters():
            if "attn2.to_v" in name:
                p.zero_()
        prompts = ["colour fundus photograph, left eye", "colour fundus photograph, right eye"]
        x = torch.randn(1, 4, gen.latent_size, gen.latent_size).repeat(2, 1, 1, 1)
        out = gen.unet(
            x, torch.tensor([500, 500]), encoder_hidden_states=gen.encode_prompts(prompts)
        ).sample
        assert (out[0] - out[1]).abs().max() > 1e-4
        gen.unet.add_embedding = None  # without the pooled pathway the prompts look alike
        gen.unet.config.addition_embed_type = None
        out = gen.unet(
            x, torch.tensor([500, 500]), encoder_hidden_states=gen.encode_prompts(prompts)
        ).sample
        assert (out[0] - out[1]).abs().max() < 1e-6


def _reference_sample(gen, prompts, seeds, steps, eta, guidance):
    """The plain loop sample() must reproduce bit for bit: per-batch encoding, per-step cat."""
    from generators.sampling import _seeded_normal, decode_latents

    sched = gen.scheduler
    sched.set_timesteps(steps, device="cpu")
    rngs = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    shape = (gen.unet.config.in_channels, gen.latent_size, gen.latent_size)
    with torch.no_grad():
        cond, uncond = gen.encode_prompts(prompts), gen.encode_prompts([""] * len(prompts))
        x = _seeded_normal(rngs, shape, "cpu", torch.float32) * sched.init_noise_sigma
        traj, logps = [x], []
        for t in sched.timesteps:
            eps = guided_noise_pred(gen, x, t, cond, uncond, guidance)
            noise = _seeded_normal(rngs, shape, "cpu", torch.float32)
            x, lp = ddim_step_with_logprob(sched, eps, t, x, eta, noise=noise)
            traj.append(x)
            logps.append(lp)
        return torch.stack(traj, 1), torch.stack(logps, 1), decode_latents(gen, x)


def test_sample_is_bit_identical_to_the_plain_loop(tiny_gen):
    """Speed-ups (cached unconditional embedding, inference mode) change no value, and the
    cache follows the text encoder's weights when they change in place."""
    prompts, seeds = PROMPTS + PROMPTS[:1], [3, 4, 5]
    for _ in range(2):
        out = sample(
            tiny_gen, prompts, seeds, num_steps=3, eta=1.0, guidance_scale=4.0, batch_size=2
        )
        for lo, hi in ((0, 2), (2, 3)):
            lat, lp, img = _reference_sample(tiny_gen, prompts[lo:hi], seeds[lo:hi], 3, 1.0, 4.0)
            assert torch.equal(out.latents[lo:hi], lat)
            assert torch.equal(out.log_probs[lo:hi], lp)
            assert torch.equal(out.images[lo:hi], img)
        assert not out.latents.is_inference() and not out.images.is_inference()
        with torch.no_grad():  # a trained text encoder: the cached "" embedding is stale
            tiny_gen.text_encoder.embeddings.word_embeddings.weight.mul_(1.5)
