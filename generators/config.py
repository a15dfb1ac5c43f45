"""Settings owned by the generator package (composed into the run config by medrl).

Every component is either built tiny and random from these numbers (demo, tests) or
loaded from ``pretrained`` (a local directory or a hub id) with the same classes.
Constraints live in field metadata (``min``, ``max``) and ``Literal`` types; the
loader in ``medrl.config`` enforces them and names the key on error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from runfiles.config import setting

#: Modalities the data tools accept (lower case). Modality is data, never a code path.
MODALITIES: tuple[str, ...] = (
    "fundus",
    "oct",
    "endoscopy",
    "colonoscopy",
    "xray",
    "ct",
    "mri",
    "ultrasound",
    "mammography",
    "dermoscopy",
    "histology",
)

#: Dataset splits a manifest row may carry.
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class DataConfig:
    root: str = setting("data/demo", "dataset root: every image path must resolve inside it")
    csv: str = setting("", "data CSV (path,Text,modality,...); empty: <root>/data.csv")
    manifest: str = setting(
        "", "Parquet manifest written by `medrl data ingest`; empty: <root>/manifest.parquet"
    )
    demo_count: int = setting(384, "images in the procedural fundus phantom dataset", min=1)
    demo_size: int = setting(64, "side of the phantom images in pixels", min=32, max=2048)
    demo_seed: int = setting(0, "seed of the phantom dataset", min=0)
    val_fraction: float = setting(
        0.1, "share of phantom images put in the val split", min=0.0, max=0.5
    )

    @property
    def csv_path(self) -> str:
        return self.csv or f"{self.root}/data.csv"

    @property
    def manifest_path(self) -> str:
        return self.manifest or f"{self.root}/manifest.parquet"


@dataclass(frozen=True)
class UNetConfig:
    pretrained: str | None = setting(
        None, "local dir or hub id holding a UNet2DConditionModel; null: build tiny"
    )
    subfolder: str | None = setting(
        None, 'subfolder of `pretrained` ("unet" for a Stable Diffusion repo)'
    )
    block_out_channels: tuple[int, ...] = setting(
        (32, 64), "channels per UNet level (built models)", min=8
    )
    layers_per_block: int = setting(1, "resnet layers per UNet block (built models)", min=1)
    attention_levels: tuple[bool, ...] = setting(
        (True, False), "which levels have cross-attention, highest resolution first (built models)"
    )
    attention_head_dim: int = setting(8, "channels per attention head (built models)", min=1)
    norm_num_groups: int = setting(8, "GroupNorm groups (built models)", min=1)
    text_time_embedding: bool = setting(
        False,
        "also add an attention-pooled text embedding to the time embedding (diffusers' "
        "addition_embed_type 'text'): a global text pathway beside cross-attention (built "
        "models; benchmarks/eye_probe.py)",
    )


@dataclass(frozen=True)
class VaeConfig:
    pretrained: str | None = setting(
        None, "local dir or hub id holding an AutoencoderKL; null: build tiny and train it first"
    )
    subfolder: str | None = setting(
        None, 'subfolder of `pretrained` ("vae" for a Stable Diffusion repo)'
    )
    block_out_channels: tuple[int, ...] = setting(
        (16, 32, 64), "channels per VAE level; downsampling = 2**(levels-1) (built models)", min=8
    )
    latent_channels: int = setting(4, "latent channels (built models)", min=1)
    layers_per_block: int = setting(1, "resnet layers per VAE block (built models)", min=1)
    norm_num_groups: int = setting(8, "GroupNorm groups (built models)", min=1)


@dataclass(frozen=True)
class TextEncoderConfig:
    pretrained: str | None = setting(
        None, "local dir or hub id of a BERT-family encoder (BioMedBERT); null: build tiny"
    )
    subfolder: str | None = setting(None, "subfolder of `pretrained` holding the encoder")
    tokenizer: str | None = setting(
        None,
        "tokenizer dir or hub id; null: `pretrained` (or the bundled demo vocabulary when built)",
    )
    tokenizer_subfolder: str | None = setting(None, "subfolder of `tokenizer`")
    max_length: int = setting(64, "tokens per prompt (BioMedBERT: 256)", min=8, max=4096)
    hidden_size: int = setting(32, "hidden size (built models)", min=8)
    num_layers: int = setting(2, "transformer layers (built models)", min=1)
    num_heads: int = setting(4, "attention heads (built models)", min=1)
    intermediate_size: int = setting(64, "feed-forward size (built models)", min=8)


@dataclass(frozen=True)
class SchedulerConfig:
    pretrained: str | None = setting(
        None, "local dir or hub id holding a scheduler config; null: build"
    )
    subfolder: str | None = setting(
        None, 'subfolder of `pretrained` ("scheduler" for a Stable Diffusion repo)'
    )
    num_train_timesteps: int = setting(1000, "training timesteps (built scheduler)", min=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = setting(
        "scaled_linear", "noise schedule (built scheduler)"
    )
    beta_start: float = setting(0.00085, "first beta (built scheduler)", min=0.0, max=1.0)
    beta_end: float = setting(0.012, "last beta (built scheduler)", min=0.0, max=1.0)
    prediction_type: Literal["epsilon", "v_prediction"] = setting(
        "epsilon", "what the UNet predicts"
    )


@dataclass(frozen=True)
class ModelConfig:
    resolution: int = setting(
        64, "image side in pixels; must be divisible by the VAE downsampling", min=16
    )
    dtype: Literal["float32", "float16", "bfloat16"] = setting(
        "float32",
        "weights dtype of `medrl generate` and rating-round sampling on a GPU; training and "
        "the RL samplers run float32 (DDPO's ratio compares the sampler's log-probabilities "
        "with the learner's), and on a CPU everything runs float32 (a warning says so)",
    )
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = setting(8, "LoRA rank r", min=1, max=1024)
    alpha: float = setting(8.0, "LoRA alpha (scale = alpha / rank); kept in every export", min=0.0)
    dropout: float = setting(0.0, "LoRA dropout", min=0.0, max=1.0)
    target_modules: tuple[str, ...] = setting(
        (
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "proj_out",
            "conv1",
            "conv2",
            "time_emb_proj",
        ),
        "UNet modules that get LoRA: attention projections, the transformer blocks' in/out "
        "projections and the resnet convolutions with their time embedding (a reward on "
        "pixels needs the convolutions: docs/rl.md)",
    )
    init: Literal["gaussian", "default"] = setting(
        "gaussian", "LoRA init: B=0 either way, so a fresh adapter leaves outputs unchanged"
    )


@dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = setting(10, "DDIM steps", min=1, max=1000)
    eta: float = setting(
        1.0,
        "DDIM eta; > 0 makes each step stochastic, so it has a log-probability",
        min=0.0,
        max=1.0,
    )
    guidance_scale: float = setting(5.0, "classifier-free guidance scale (1: no guidance)", min=1.0)
    batch_size: int = setting(8, "images per forward pass", min=1)
    merge_lora: bool = setting(
        True,
        "RL samplers: fold the LoRA adapter into the UNet's weights once per adapter version "
        "(peft merge; the base weights are restored exactly before the next) instead of "
        "adding it beside every layer in every step: ~5% more images/s on the anchor model, "
        "recorded log-probs within 1e-6 of the learner's unmerged recomputation",
    )
    compile: bool = setting(
        False,
        "RL samplers: torch.compile the UNet (inductor; needs a C++ compiler on CPU). Each "
        "sampler compiles on its first draw (~80 s per process on 2 CPU cores, ~20 s with "
        "torch's on-disk cache warm), then draws ~1.2x the images/s on the anchor model; a "
        "failed compile draws eagerly after one warning",
    )


@dataclass(frozen=True)
class FinetuneConfig:
    mode: Literal["full", "lora"] = setting(
        "full",
        "train the whole UNet or a LoRA adapter on it (finetune.lora); either way the saved "
        "generator/ holds what was learned (a LoRA is merged into its UNet)",
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    train_text_encoder: bool = setting(
        False, "also train the text encoder (full weights, saved in generator/text_encoder)"
    )
    steps: int = setting(1500, "UNet optimiser steps", min=1)
    batch_size: int = setting(32, "images per step", min=1)
    lr: float = setting(
        1e-3, "UNet learning rate (use ~1e-4 for LoRA on a pretrained UNet)", min=0.0
    )
    text_encoder_lr: float = setting(1e-4, "text encoder learning rate", min=0.0)
    weight_decay: float = setting(1e-2, "AdamW weight decay", min=0.0)
    warmup_steps: int = setting(50, "linear learning-rate warm-up steps", min=0)
    grad_clip: float = setting(1.0, "gradient norm clip (0: off)", min=0.0)
    text_dropout: float = setting(
        0.1,
        "probability a caption is replaced by the empty prompt (classifier-free guidance)",
        min=0.0,
        max=1.0,
    )
    align_weight: float = setting(
        0.0,
        "Feature-Aligned Diffusion: weight of the alignment of the UNet's down-block features "
        "to the expert's (finetune.align_expert) added to the denoising loss (0: off)",
        min=0.0,
    )
    align_expert: str = setting(
        "",
        "the expert of finetune.align_weight: a selector checkpoint directory, or a "
        "reward-models directory holding selector/; empty: <run dir>/rewards",
    )
    checkpoint_every: int = setting(500, "steps between checkpoints", min=1)
    keep_checkpoints: int = setting(
        2, "checkpoints kept on disk (oldest deleted after a newer is committed)", min=1
    )
    sample_every: int = setting(500, "steps between sample grids in TensorBoard (0: off)", min=0)
    log_every: int = setting(25, "steps between loss logs", min=1)
    vae_steps: int = setting(
        600, "VAE steps before the UNet when no pretrained VAE is given", min=0
    )
    vae_lr: float = setting(2e-3, "VAE learning rate", min=0.0)
    vae_batch_size: int = setting(16, "VAE images per step", min=1)
    vae_kl_weight: float = setting(
        1e-6, "weight of the KL term (per latent element, mean-reduced) in the VAE loss", min=0.0
    )
    vae_l1_weight: float = setting(1.0, "weight of the pixel L1 in the VAE loss", min=0.0)
    vae_mse_weight: float = setting(
        0.0, "weight of the pixel MSE in the VAE loss (the recipe before issue 10: 1.0)", min=0.0
    )
    vae_laplacian_weight: float = setting(
        1.0,
        "weight of the Laplacian-pyramid L1 (edges, the phantom's vessels) in the VAE loss "
        "(0: off, the recipe before issue 10)",
        min=0.0,
    )
    vae_laplacian_levels: int = setting(3, "band-pass levels of the Laplacian pyramid", min=1)
    vae_disc_weight: float = setting(
        0.5,
        "weight of the PatchGAN hinge loss on the decoder, times the LDM adaptive weight "
        "(0: no discriminator, the recipe before issue 10)",
        min=0.0,
    )
    vae_disc_start: int = setting(
        100,
        "VAE step from which the discriminator trains and its loss reaches the decoder "
        "(0: from the first step; >= vae_steps: never)",
        min=0,
    )
    vae_disc_lr: float = setting(
        5e-4, "discriminator learning rate (Adam, betas 0.5, 0.9)", min=0.0
    )
    vae_disc_channels: int = setting(32, "channels of the discriminator's first layer", min=4)
    vae_disc_layers: int = setting(2, "stride-2 layers of the PatchGAN discriminator", min=1, max=5)
    vae_disc_max_weight: float = setting(
        1e4, "clamp of the LDM adaptive weight of the adversarial term", min=0.0
    )
    num_workers: int = setting(0, "DataLoader worker processes", min=0)
