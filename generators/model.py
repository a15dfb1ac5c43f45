"""Building the generator: UNet + VAE + BERT-family text encoder + DDIM scheduler.

Every part is either built tiny and random from :class:`~generators.config.ModelConfig`
(demo, tests) or loaded from a local directory or hub id; the classes are the same
(``UNet2DConditionModel``, ``AutoencoderKL``, ``AutoModel``/``BertModel``,
``DDIMScheduler``), and the parts are held together by a diffusers
``StableDiffusionPipeline`` so that ``save_pretrained``/``from_pretrained`` and
``load_lora_weights`` work on a medrl generator exactly as on Stable Diffusion.
Weights from outside load from safetensors only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

from generators.config import (
    ModelConfig,
    SchedulerConfig,
    TextEncoderConfig,
    UNetConfig,
    VaeConfig,
)
from runfiles import staged_folder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: File in a saved generator directory recording medrl's own facts about it.
GENERATOR_META = "medrl_generator.json"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` or None -> cuda when available, else cpu; anything else as torch reads it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def inference_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``model.dtype`` for inference on ``device``: as configured on a GPU; float32 on a CPU
    (half-precision convolutions are slow or missing there), with a warning saying so."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtype:
        raise ValueError(f"model.dtype: {name!r} is not one of {', '.join(dtype)}")
    if torch.device(device).type == "cpu" and name != "float32":
        log.warning(
            "model.dtype is %s but the device is a CPU: sampling runs in float32 instead "
            "(%s applies on GPUs)", name, name,
        )  # fmt: skip
        return torch.float32
    return dtype[name]


# --------------------------------------------------------------------------- parts


def build_tokenizer(cfg: TextEncoderConfig):
    """The tokenizer: from ``tokenizer``/``pretrained`` or the bundled demo vocabulary."""
    source = cfg.tokenizer or cfg.pretrained
    if source:
        kwargs = {"subfolder": cfg.tokenizer_subfolder} if cfg.tokenizer_subfolder else {}
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    else:
        vocab = resources.files("generators") / "assets" / "demo-vocab.txt"
        with resources.as_file(vocab) as path:
            # transformers 5 ignores ``vocab_file=`` here (every word becomes [UNK]); pass vocab=
            tok = BertTokenizerFast(vocab=str(path), do_lower_case=True)
        if len(tok) < 10:
            raise RuntimeError(f"demo tokenizer vocabulary did not load from {vocab}")
    tok.model_max_length = cfg.max_length
    return tok


def build_text_encoder(cfg: TextEncoderConfig, vocab_size: int) -> torch.nn.Module:
    """A BERT-family encoder: ``AutoModel.from_pretrained`` or a tiny random ``BertModel``."""
    if cfg.pretrained:
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        model = AutoModel.from_pretrained(cfg.pretrained, use_safetensors=True, **kwargs)
    else:
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(
                f"model.text_encoder.hidden_size ({cfg.hidden_size}) must be divisible by "
                f"model.text_encoder.num_heads ({cfg.num_heads})"
            )
        model = BertModel(
            BertConfig(
                vocab_size=vocab_size,
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=max(cfg.max_length, 64),
            ),
            add_pooling_layer=False,
        )
    # StableDiffusionPipeline passes the attention mask only when the encoder's config
    # asks for it; BERT encoders should not attend to padding.
    model.config.use_attention_mask = True
    return model


def build_vae(cfg: VaeConfig, resolution: int) -> AutoencoderKL:
    if cfg.pretrained:
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        return AutoencoderKL.from_pretrained(cfg.pretrained, use_safetensors=True, **kwargs)
    levels = len(cfg.block_out_channels)
    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups:
            raise ValueError(
                f"model.vae.block_out_channels: {c} is not divisible by "
                f"model.vae.norm_num_groups ({cfg.norm_num_groups})"
            )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        latent_channels=cfg.latent_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=resolution,
        # set from the data after the VAE is trained (1 / std of latents)
        scaling_factor=1.0,
    )


def build_unet(
    cfg: UNetConfig, sample_size: int, latent_channels: int, cross_attention_dim: int
) -> UNet2DConditionModel:
    if cfg.pretrained:
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        unet = UNet2DConditionModel.from_pretrained(cfg.pretrained, use_safetensors=True, **kwargs)
        if unet.config.cross_attention_dim != cross_attention_dim:
            raise ValueError(
                f"model.unet: the UNet's cross_attention_dim is {unet.config.cross_attention_dim} "
                f"but the text encoder's hidden size is {cross_attention_dim}; pick parts that match"
            )
        return unet
    if len(cfg.attention_levels) != len(cfg.block_out_channels):
        raise ValueError(
            "model.unet.attention_levels must have one entry per model.unet.block_out_channels "
            f"level ({len(cfg.block_out_channels)}), got {len(cfg.attention_levels)}"
        )
    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups or c % cfg.attention_head_dim:
            raise ValueError(
                f"model.unet.block_out_channels: {c} must be divisible by norm_num_groups "
                f"({cfg.norm_num_groups}) and attention_head_dim ({cfg.attention_head_dim})"
            )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cross_attention_dim,
        # diffusers' (historically misnamed) attention_head_dim is the number of heads
        attention_head_dim=tuple(
            max(1, c // cfg.attention_head_dim) for c in cfg.block_out_channels
        ),
        norm_num_groups=cfg.norm_num_groups,
        **(
            {
                "addition_embed_type": "text",
                "addition_embed_type_num_heads": math.gcd(cross_attention_dim, 8),
            }
            if cfg.text_time_embedding
            else {}
        ),  # fmt: skip
    )


def build_scheduler(cfg: SchedulerConfig) -> DDIMScheduler:
    if cfg.pretrained:
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        return DDIMScheduler.from_pretrained(cfg.pretrained, **kwargs)
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# --------------------------------------------------------------------------- generator


@dataclass
class Generator:
    """The parts of a latent diffusion generator, held in a diffusers pipeline."""

    pipe: StableDiffusionPipeline
    resolution: int
    #: True when the VAE still needs training on the data (built, no pretrained weights)
    vae_untrained: bool = False

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipe.unet

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipe.vae

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def scheduler(self) -> DDIMScheduler:
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def latent_size(self) -> int:
        return self.resolution // self.pipe.vae_scale_factor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Generator:
        self.pipe.to(device, dtype) if dtype is not None else self.pipe.to(device)
        return self

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, max_length, hidden) for the UNet's cross-attention.

        Gradients flow when called under grad mode (text-encoder training); samplers call
        it under ``torch.no_grad()``. Same tokenisation as ``StableDiffusionPipeline``.
        """
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = self.text_encoder(
            tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
        )
        return out[0]

    def save(self, path: str | os.PathLike, finetune: Mapping | None = None) -> Path:
        """Save as a diffusers pipeline directory, atomically (temporary dir, then rename).

        ``finetune`` (mode, steps, ...) is recorded in the directory's medrl_generator.json.
        """
        if getattr(self.unet, "peft_config", None):
            raise ValueError(
                "Generator.save: the UNet carries a LoRA adapter; merge it (generators.lora."
                "merge_lora) or save the adapter on its own (save_adapter)"
            )
        path = Path(path)
        with staged_folder(path) as tmp:
            self.pipe.save_pretrained(tmp, safe_serialization=True)
            meta = {"resolution": self.resolution, "vae_untrained": self.vae_untrained}
            if finetune:
                meta["finetune"] = dict(finetune)
            (tmp / GENERATOR_META).write_text(json.dumps(meta))
        return path


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler) -> StableDiffusionPipeline:
    """The parts as a ``StableDiffusionPipeline`` without safety checker, progress bar off."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_generator(cfg: ModelConfig, seed: int = 0) -> Generator:
    """Build (or load) every part from config. Random parts are seeded with ``seed``.

    Raises:
        ValueError: parts that do not fit together (resolution vs VAE, UNet vs text encoder).
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(cfg.text_encoder)
    text_encoder = build_text_encoder(cfg.text_encoder, vocab_size=len(tokenizer))
    vae = build_vae(cfg.vae, cfg.resolution)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.resolution % factor:
        raise ValueError(
            f"model.resolution: {cfg.resolution} is not divisible by the VAE downsampling factor {factor}"
        )
    unet = build_unet(
        cfg.unet,
        sample_size=cfg.resolution // factor,
        latent_channels=vae.config.latent_channels,
        cross_attention_dim=text_encoder.config.hidden_size,
    )
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"model.unet has {unet.config.in_channels} input channels but the VAE makes "
            f"{vae.config.latent_channels} latent channels"
        )
    scheduler = build_scheduler(cfg.scheduler)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler)
    for module in (unet, vae, text_encoder):
        module.eval()
    return Generator(pipe=pipe, resolution=cfg.resolution, vae_untrained=cfg.vae.pretrained is None)


def load_generator(path: str | os.PathLike) -> Generator:
    """Load a generator saved by :meth:`Generator.save` (a diffusers pipeline directory)."""
    path = Path(path)
    meta_file = path / GENERATOR_META
    if not (path / "model_index.json").is_file() or not meta_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a medrl generator directory (model_index.json and {GENERATOR_META} expected); "
            "run `medrl finetune` first"
        )
    meta = json.loads(meta_file.read_text())
    import diffusers
    import transformers

    # quiet: BERT without a pooler reports it "missing", and the pipeline class says it
    # expected a CLIP text encoder; both are by design here
    t_verbosity = transformers.logging.get_verbosity()
    d_verbosity = diffusers.utils.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, safety_checker=None, requires_safety_checker=False, use_safetensors=True
        )
    finally:
        transformers.logging.set_verbosity(t_verbosity)
        diffusers.utils.logging.set_verbosity(d_verbosity)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.config.use_attention_mask = True
    return Generator(
        pipe=pipe, resolution=int(meta["resolution"]), vae_untrained=bool(meta["vae_untrained"])
    )
