"""DDIM sampling with classifier-free guidance and per-step log-probabilities.

DDPO treats each DDIM step with eta > 0 as a Gaussian policy
``x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I)``. :func:`ddim_step_with_logprob` computes
the step and the log-density of the chosen ``x_{t-1}`` exactly as trl 0.23's
``scheduler_step`` (the DDPO reference implementation) does:

    prev_t          = clamp(t - T_train // n_steps, 0, T_train - 1)
    x0_hat          = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)                (epsilon prediction)
    sigma_t         = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mu              = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps
    log p(x_{t-1})  = mean over latent dims of
                      [ -(x_{t-1} - mu)^2 / (2 sigma_t^2) - log sigma_t - log sqrt(2 pi) ]

(``a`` is ``alphas_cumprod``). Note the *mean* over dimensions, not the sum: DDPO's
ratios and clip ranges are calibrated to it.

Each sample draws all its noise (initial latent and every step) from its own
``torch.Generator`` seeded with its seed, so an image depends only on its prompt, seed
and the weights, never on which other samples share its batch or which actor drew it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from generators.model import Generator


@dataclass
class SampleBatch:
    """What sampling returns; the RL learner replays ``latents``/``timesteps``."""

    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32, cpu
    latents: torch.Tensor  # (B, T + 1, C, h, w): x_T ... x_0 (unscaled latent space)
    timesteps: torch.Tensor  # (T,) the DDIM timesteps, first to last
    log_probs: torch.Tensor  # (B, T): log p(latents[:, i + 1] | latents[:, i])
    prompts: list[str]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    @staticmethod
    def cat(batches: Sequence[SampleBatch]) -> SampleBatch:
        if not batches:
            raise ValueError("SampleBatch.cat: no batches")
        for b in batches[1:]:
            if not torch.equal(b.timesteps, batches[0].timesteps):
                raise ValueError("SampleBatch.cat: batches were drawn with different timesteps")
        return SampleBatch(
            images=torch.cat([b.images for b in batches]),
            latents=torch.cat([b.latents for b in batches]),
            timesteps=batches[0].timesteps,
            log_probs=torch.cat([b.log_probs for b in batches]),
            prompts=[p for b in batches for p in b.prompts],
            seeds=[s for b in batches for s in b.seeds],
        )


def _left_broadcast(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return x.reshape(x.shape + (1,) * (len(shape) - x.dim())).expand(shape)


def ddim_mean_std(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the DDIM transition x_t -> x_{t-1} (both shaped like ``sample``).

    The learner's KL penalty to the base model compares two such Gaussians in closed form.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) before stepping")
    cfg = scheduler.config
    t = torch.as_tensor(timestep, device="cpu").long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(sample.shape[0])
    prev_t = (t - cfg.num_train_timesteps // scheduler.num_inference_steps).clamp(
        0, cfg.num_train_timesteps - 1
    )
    acp = scheduler.alphas_cumprod.to(torch.float64)
    a_t = acp.gather(0, t)
    a_prev = acp.gather(0, prev_t)  # prev_t >= 0 after the clamp, as in trl
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.sqrt()

    dtype, device = sample.dtype, sample.device
    a_t = _left_broadcast(a_t.to(device, dtype), sample.shape)
    a_prev = _left_broadcast(a_prev.to(device, dtype), sample.shape)
    std = _left_broadcast(std.to(device, dtype), sample.shape)

    if cfg.prediction_type == "epsilon":
        x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
        eps = model_output
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
        eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * sample
    elif cfg.prediction_type == "sample":
        x0 = model_output
        eps = (sample - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)

    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step and the log-probability of its result (DDPO's formula, see module doc).

    Args:
        scheduler: a DDIMScheduler after ``set_timesteps``.
        model_output: the (guided) UNet prediction for ``sample``.
        timestep: current timestep, a scalar or one per sample (B,).
        sample: x_t, (B, C, h, w).
        eta: DDIM eta; > 0 for a log-probability to exist (0: deterministic DDIM, NaN log-prob).
        prev_sample: x_{t-1} to score (learner replay); drawn when None.
        noise: standard normal noise for the draw (B, C, h, w); required when
            ``prev_sample`` is None.

    Returns:
        (prev_sample, log_prob of shape (B,)).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta == 0 and prev_sample is not None:
        raise ValueError(
            "eta must be > 0 to score a transition: a deterministic step has no density"
        )
    if prev_sample is None and noise is None:
        raise ValueError("give either prev_sample (to score) or noise (to draw)")
    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    device, dtype = sample.device, sample.dtype
    if eta == 0:  # plain deterministic DDIM: no log-probability
        return mean, torch.full((sample.shape[0],), float("nan"), device=device)
    if prev_sample is None:
        prev_sample = mean + std * noise.to(device, dtype)
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.dim())))


def guided_noise_pred(
    gen: Generator,
    latents: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """UNet prediction with classifier-free guidance (one batched forward for both halves)."""
    if uncond is None or guidance_scale == 1.0:
        return gen.unet(latents, t, encoder_hidden_states=cond).sample
    return _guided(gen, latents, t, torch.cat([uncond, cond]), guidance_scale)


def _guided(
    gen: Generator,
    latents: torch.Tensor,
    t: torch.Tensor | int,
    both: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """CFG with the embeddings already stacked as ``[uncond; cond]`` (one cat per batch)."""
    t_in = t if not torch.is_tensor(t) or t.dim() == 0 else torch.cat([t, t])
    out = gen.unet(torch.cat([latents, latents]), t_in, encoder_hidden_states=both).sample
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


#: text encoder -> (weights key, {batch length: unconditional embeddings})
_UNCOND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(module: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is replaced, moved or written in place."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in module.parameters())


def _unconditional_embeddings(gen: Generator, n: int) -> torch.Tensor:
    """``gen.encode_prompts([""] * n)``, computed once per text-encoder state and length.

    The cache follows the encoder's weights (pointer and in-place version of every
    parameter), so a trained or moved text encoder is encoded afresh.
    """
    te = gen.text_encoder
    key = _weights_key(te)
    entry = _UNCOND.get(te)
    if entry is None or entry[0] != key:
        entry = (key, {})
        _UNCOND[te] = entry
    if n not in entry[1]:
        with torch.inference_mode():
            entry[1][n] = gen.encode_prompts([""] * n)
    return entry[1][n]


def _seeded_normal(
    generators: list[torch.Generator], shape: tuple[int, ...], device, dtype
) -> torch.Tensor:
    return torch.stack(
        [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    ).to(device, dtype)


@torch.no_grad()
def decode_latents(gen: Generator, latents: torch.Tensor) -> torch.Tensor:
    """Latents (unscaled diffusion space) -> images in [-1, 1], float32 on cpu."""
    vae = gen.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return images.float().clamp(-1, 1).cpu()


@torch.no_grad()
def sample(
    gen: Generator,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_steps: int = 10,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    batch_size: int = 8,
    progress: bool = False,
) -> SampleBatch:
    """Draw one image per (prompt, seed) with DDIM + CFG, keeping the trajectory.

    Args:
        gen: the generator (on its device; LoRA adapters, if attached, are active).
        prompts: one prompt per image.
        seeds: one seed per image; the same (prompt, seed, weights) give the same image.
        num_steps: DDIM steps.
        eta: DDIM eta (> 0: stochastic steps with log-probabilities; 0: deterministic
            DDIM, log_probs are NaN).
        guidance_scale: classifier-free guidance scale (1 = none).
        batch_size: images per UNet forward pass.
        progress: show a progress bar over batches.

    Returns:
        A :class:`SampleBatch` on the cpu.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise ValueError("sample: no prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"sample: prompt {i} is empty")
    scheduler = gen.scheduler
    scheduler.set_timesteps(num_steps, device="cpu")
    timesteps = scheduler.timesteps.clone()
    chunks = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress, leave=False):
        bp, bs = prompts[start : start + batch_size], seeds[start : start + batch_size]
        chunks.append(_draw_batch(gen, bp, bs, timesteps, eta, guidance_scale))
    # outside inference mode: the learner replays these tensors under autograd
    return SampleBatch.cat(chunks)


@torch.inference_mode()
def _draw_batch(
    gen: Generator,
    prompts: list[str],
    seeds: list[int],
    timesteps: torch.Tensor,
    eta: float,
    guidance_scale: float,
) -> SampleBatch:
    """One UNet batch of :func:`sample`; its tensors are inference tensors until cat."""
    scheduler, device, dtype = gen.scheduler, gen.device, gen.unet.dtype
    shape = (gen.unet.config.in_channels, gen.latent_size, gen.latent_size)
    rngs = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    cond = gen.encode_prompts(prompts)
    both = None
    if guidance_scale != 1.0:
        both = torch.cat([_unconditional_embeddings(gen, len(prompts)), cond])
    latents = _seeded_normal(rngs, shape, device, dtype) * scheduler.init_noise_sigma
    traj, logps = [latents.float().cpu()], []
    for t, t_dev in zip(timesteps, timesteps.to(device), strict=True):
        model_in = scheduler.scale_model_input(latents, t)
        if both is None:
            noise_pred = gen.unet(model_in, t_dev, encoder_hidden_states=cond).sample
        else:
            noise_pred = _guided(gen, model_in, t_dev, both, guidance_scale)
        noise = _seeded_normal(rngs, shape, device, dtype)
        latents, logp = ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta, noise=noise)
        traj.append(latents.float().cpu())
        logps.append(logp.float().cpu())
    return SampleBatch(
        images=decode_latents(gen, latents),
        latents=torch.stack(traj, dim=1),
        timesteps=timesteps,
        log_probs=torch.stack(logps, dim=1),
        prompts=prompts,
        seeds=seeds,
    )
