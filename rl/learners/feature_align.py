"""``rl.algorithm=feature_align``: filter_retrain plus Feature-Aligned Diffusion (FAD).

The step is :class:`~rl.learners.filter_retrain.SupervisedLearner`'s (the supervised
denoising loss of the guided prediction on the samples that pass the gate, mixed with
``rl.real_share`` real pairs) plus FAD's alignment term (section IV of the paper;
:mod:`generators.feature_align` has the loss and what the expert sees):

    loss = L_noise + rl.align_weight * L_align
    L_align = -sum_i w_i cos(W_p f_e(x_t,i^pix), pool(f_down(z_t,i, t_i, c_i))) / sum_i w_i

where f_e is the frozen quality selector's pooled ViT features (``rl.align_expert``, or
the selector of ``rl.reward``'s reward-models directory), x_t^pix the micro-batch's clean
latents decoded by the VAE and noised in pixels at the same t, and f_down the output of
the UNet's last down block in the same forward that gives the guided prediction (its
conditional half), average-pooled.

W_p (E_e x E_d, no bias) is a module of the UNet under the DeepSpeed engine (the name
:data:`HEAD`), so the engine's optimizer, gradient clipping, ZeRO partitioning and the
learner's checkpoints (``engine/parameters.safetensors``, the optimizer files) hold it
with the LoRA weights and a resumed run continues exactly; the adapter the samplers
receive and the exported LoRA are peft's keys only, without it.
"""

from __future__ import annotations

from typing import Any

import torch

from generators.feature_align import (
    AlignHead,
    DownFeatures,
    alignment_loss,
    decode_pixels,
    expert_features,
    noisy_pixels,
    unet_feature_dim,
)
from generators.training_common import STRIDE, NoisedLatents
from rl.config import RLRun
from rl.learners.filter_retrain import SupervisedLearner

#: W_p's module name on the UNet (its parameters: ``feature_align_head.weight``)
HEAD = "feature_align_head"


def load_expert(run: RLRun, inputs: dict[str, Any], device: torch.device | str) -> Any:
    """The frozen selector ``rl.align_expert`` names, else ``rl.reward``'s; a pixel reward
    without ``rl.align_expert`` is a ValueError naming both keys."""
    from rewards.scorers import load_selector, parse_spec

    if run.rl.align_expert:
        return load_selector(run.rl.align_expert, "rl.align_expert", device)
    reward = inputs.get("reward") or run.rl.reward or str(run.run_dir / "rewards")
    spec = parse_spec(reward)
    if spec.kind != "models":
        raise ValueError(
            f"rl.algorithm=feature_align aligns to a quality selector, but rl.reward={reward} "
            "has none: set rl.align_expert to a selector or reward-models directory"
        )
    return load_selector(spec.path, "rl.reward", device)


class FeatureAlignLearner(SupervisedLearner):
    """``rl.algorithm=feature_align`` (see the module docstring)."""

    def setup(self) -> None:
        super().setup()
        self.run_seed = 0
        self.down = DownFeatures(self.engine.module)

    def _extra_trainable(self, seed: int) -> list[torch.nn.Parameter]:
        """W_p, registered on the UNet as :data:`HEAD` (called by Learner's init, before
        the engine exists: the expert's width sizes it)."""
        self.expert = load_expert(self.run, self.inputs, self.device)
        head = AlignHead(self.expert.feature_dim, unet_feature_dim(self.gen.unet), seed)
        self.gen.unet.add_module(HEAD, head.to(self.device))
        return list(head.parameters())

    def train(self, batch: Any, iteration: int, seed: int) -> dict[str, float]:
        self.run_seed = seed  # the pixel noise's draws, as SupervisedLearner's are, follow it
        return super().train(batch, iteration, seed)

    @property
    def head(self) -> torch.nn.Module:
        return getattr(self.engine.module, HEAD)

    def extra_loss(
        self, sft: torch.Tensor, noised: NoisedLatents, pred: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The supervised loss plus ``rl.align_weight * L_align`` of the forward that gave
        ``pred``; the pixel noise is drawn from (run seed, optimizer step), so a resumed run
        draws it again."""
        align, cos = self.alignment(noised, self.down.take(len(w)), w)
        loss = sft + self.cfg.align_weight * align
        return loss, {"align_loss": align.detach(), "align_cos": cos.mean()}

    def alignment(
        self,
        noised: NoisedLatents,
        unet_feats: torch.Tensor,
        w: torch.Tensor | None = None,
        g: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_align, per-row cosine) of the UNet features ``unet_feats`` of ``noised``; the
        pixel noise from ``g``, else from (run seed, optimizer step)."""
        if g is None:
            g = torch.Generator().manual_seed(
                (self.run_seed * STRIDE + self.optimizer_steps) * 7 + 1
            )
        pixels = decode_pixels(self.gen.vae, noised.latents)
        noisy = noisy_pixels(self.scheduler, pixels, noised.t, self.expert.image_size, g)
        return alignment_loss(self.head, expert_features(self.expert, noisy), unet_feats, w)
