"""The two reward models: the ViT quality *selector* and the ViT + BERT *alignment policy*.

Both are stochastic policies over a score in [0, 1]: a head gives the parameters of a
Beta(alpha, beta) distribution (softplus + 1, so both are > 1 and the density is
unimodal), and the model's score is its mean alpha / (alpha + beta). Each model also has
a value head of its own (a separate MLP on the same features, never the policy's
output) that REINFORCE uses as its baseline (rewards/training.py).

- selector: ``ViTModel`` -> image embedding -> MLP -> (alpha, beta); images only.
- alignment policy: the ViT image embedding (768 in the full preset) and the mean over
  tokens of a BERT-family encoder's last layer (BioMedBERT, 768), fused by
  ``rewards.fusion``:

  - ``interaction`` (default): both projected to a shared width d
    (``rewards.fusion_dim``) and L2-normalised (times sqrt(d)) to u and v, then
    [u, v, |u - v|, u * v] (4d) -> MLP -> (alpha, beta). The match of image and prompt
    (an exclusive-or of an image and a text feature, such as "which eye") is a simple
    function of |u - v| and u * v, where a concatenation leaves the MLP to discover it.
    The projections are the space that contrastive pre-training (rewards/contrastive.py)
    aligns.
  - ``concat`` (the original fusion): [image ; text] (1536) -> MLP 768 -> 384 ->
    (alpha, beta). Checkpoints without a ``fusion`` entry are this.

The image embedding is the mean of the ViT's final (LayerNorm-ed) patch tokens, or its
[CLS] token (``rewards.vision.pooling``).

Images are scored independently: the models run in eval mode (no dropout), have no
batch statistics (LayerNorm only) and attention never crosses images in a batch.

Backbones load from a local directory or hub id (safetensors only) or are built from
config; :func:`save_reward_model` / :func:`load_reward_model` write and read a
checkpoint directory (``model.safetensors`` + ``reward_model.json`` [+ ``tokenizer/``])
that rebuilds the same model with no network access.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, ViTConfig, ViTModel

from generators.config import TextEncoderConfig
from generators.images import resize, to_tensor
from generators.model import build_text_encoder, build_tokenizer
from rewards.config import RewardsConfig, VisionConfig
from runfiles import check_format, staged_folder

CHECKPOINT_FORMAT = "medrl-reward-model"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "reward_model.json"
TOKENIZER_DIR = "tokenizer"
Kind = Literal["selector", "alignment"]
FUSIONS = ("concat", "interaction")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- parts


def build_vit(cfg: VisionConfig) -> ViTModel:
    """A ViT without pooler: ``from_pretrained`` (safetensors) or built from the sizes.

    A built ViT takes 6 channels when ``cfg.use_detail_channels`` (see :class:`DetailChannels`).
    """
    if cfg.pretrained:
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        return ViTModel.from_pretrained(
            cfg.pretrained, use_safetensors=True, add_pooling_layer=False, **kwargs
        )
    return ViTModel(
        ViTConfig(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            num_channels=6 if cfg.use_detail_channels else 3,
        ),
        add_pooling_layer=False,
    )


class DetailChannels(nn.Module):
    """RGB in [-1, 1] -> RGB + 3 local-detail channels |x - blur3x3(x)|, scaled to [-1, 1].

    A fixed, parameter-free input transform for ViTs trained from scratch. A ViT's first
    operation is linear over each patch, so per-pixel statistics such as sensor noise or
    the loss of fine detail to blur (which need a nonlinearity per pixel) average out
    inside the patch; measured on the phantom, a tiny ViT did not learn to detect noise
    from RGB at all (AUC 0.59 on 1600 images) but does with these channels. Pretrained
    ViTs have learnt such features and take plain RGB. Each image is transformed on its
    own (a depthwise 3x3 convolution), so images in a batch stay independent.
    """

    #: |x - blur(x)| >= 2 / GAIN (0.25 in [-1, 1] units) maps to the top of the range (1).
    GAIN = 8.0

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        kernel = (k[:, None] * k[None, :] / 16.0).expand(3, 1, 3, 3).clone()
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(
            F.pad(x, (1, 1, 1, 1), mode="replicate"), self.kernel.to(x.dtype), groups=3
        )
        detail = ((x - blurred).abs() * self.GAIN).clamp(max=2.0) - 1.0
        return torch.cat([x, detail], dim=1)


POOLINGS = ("mean", "cls", "grid")


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; allowed: {', '.join(map(repr, POOLINGS))}")


def pooled_size(hidden: int, pooling: str) -> int:
    """Width of the pooled image embedding: D, or 4 D for ``grid``."""
    _check_pooling(pooling)
    return 4 * hidden if pooling == "grid" else hidden


def _pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, 1 + patches, D) final ViT states -> (B, D) or (B, 4 D).

    ``mean``: patch-token mean; ``cls``: the [CLS] token; ``grid``: the patch-token means
    of the four quadrants (top-left, top-right, bottom-left, bottom-right) side by side,
    which keeps where a structure lies (which side the optic disc is on: the eye) where a
    mean over all patches is blind to it until the ViT writes position into its tokens.
    """
    _check_pooling(pooling)
    if pooling == "mean":
        return hidden[:, 1:].mean(dim=1)
    if pooling == "cls":
        return hidden[:, 0]
    patches = hidden[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1] or side < 2:
        raise ValueError(
            f"grid pooling needs a square grid of >= 2x2 patches, got {patches.shape[1]}"
        )
    grid = patches.reshape(len(patches), side, side, -1)
    h = side // 2
    quads = [grid[:, :h, :h], grid[:, :h, h:], grid[:, h:, :h], grid[:, h:, h:]]
    return torch.cat([q.mean(dim=(1, 2)) for q in quads], dim=-1)


def _image_stem(vit: ViTModel) -> nn.Module:
    """What turns RGB into the ViT's input: DetailChannels for a 6-channel ViT, else nothing."""
    channels = int(vit.config.num_channels)
    if channels == 6:
        return DetailChannels()
    if channels == 3:
        return nn.Identity()
    raise ValueError(f"ViT takes {channels} channels; reward models feed it 3 (RGB) or 6")


def vision_input_size(cfg: VisionConfig) -> int:
    """The image side the ViT of ``cfg`` takes (a loaded ViT's own, read from its config)."""
    if cfg.pretrained:
        kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
        return int(ViTConfig.from_pretrained(cfg.pretrained, **kwargs).image_size)
    return cfg.image_size


def _drop_pooler(model: nn.Module) -> nn.Module:
    """Remove an unused BERT pooler (mean pooling is used), so every weight gets gradients."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.GELU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def prepare_images(
    images: torch.Tensor | np.ndarray | Sequence[np.ndarray], size: int
) -> torch.Tensor:
    """uint8 (H, W, 3) arrays or float (B, 3, H, W) in [-1, 1] -> (B, 3, size, size) in [-1, 1].

    [-1, 1] is also what ViT checkpoints normalised with mean = std = 0.5 expect.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
    else:
        arrays = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else images
        x = torch.stack([to_tensor(np.asarray(a)) for a in arrays])
    return resize(x, size)


# --------------------------------------------------------------------------- policy output


@dataclass
class PolicyOutput:
    """Beta parameters (B,), the value estimate (B,) and the features they came from."""

    alpha: torch.Tensor
    beta: torch.Tensor
    value: torch.Tensor

    def distribution(self) -> torch.distributions.Beta:
        return torch.distributions.Beta(self.alpha, self.beta)

    @property
    def mean(self) -> torch.Tensor:
        """The score: the policy's mean alpha / (alpha + beta), in (0, 1)."""
        return self.alpha / (self.alpha + self.beta)


class BetaPolicyHead(nn.Module):
    """Features -> (alpha, beta) = softplus(MLP(features)) + 1."""

    def __init__(self, in_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.mlp = _mlp(in_dim, hidden, 2)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = F.softplus(self.mlp(features)) + 1.0
        return params[:, 0], params[:, 1]


class ValueHead(nn.Module):
    """Features -> V(x), the expected REINFORCE reward (its own MLP; trained by MSE)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = _mlp(in_dim, (hidden,), 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).squeeze(-1)


# --------------------------------------------------------------------------- models


class QualitySelector(nn.Module):
    """ViT -> image embedding -> Beta policy head (quality score) and a separate value head."""

    kind: Kind = "selector"

    def __init__(
        self, vit: ViTModel, head_hidden: Sequence[int], value_hidden: int, pooling: str = "mean"
    ):
        super().__init__()
        _check_pooling(pooling)
        self.vit = vit
        self.pooling = pooling
        self.stem = _image_stem(vit)
        dim = pooled_size(vit.config.hidden_size, pooling)
        self.head_hidden = tuple(int(h) for h in head_hidden)
        self.value_hidden = int(value_hidden)
        self.policy_head = BetaPolicyHead(dim, self.head_hidden)
        self.value_head = ValueHead(dim, self.value_hidden)

    @property
    def image_size(self) -> int:
        return int(self.vit.config.image_size)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, hidden): pooled final-LayerNorm tokens."""
        return _pool(self.vit(pixel_values=self.stem(pixel_values)).last_hidden_state, self.pooling)

    def forward(self, pixel_values: torch.Tensor) -> PolicyOutput:
        feats = self.features(pixel_values)
        alpha, beta = self.policy_head(feats)
        return PolicyOutput(alpha, beta, self.value_head(feats))

    def inputs(self, images: Any, prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for raw images (prompts are ignored: quality needs no text)."""
        device = next(self.parameters()).device
        return {"pixel_values": prepare_images(images, self.image_size).to(device)}

    @torch.no_grad()
    def score(self, images: Any, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Quality scores in [0, 1], one per image (eval mode; images independent)."""
        was_training = self.training
        self.eval()
        try:
            return self(**self.inputs(images)).mean
        finally:
            self.train(was_training)

    def architecture(self) -> dict[str, Any]:
        return {
            "vision": self.vit.config.to_dict(),
            "pooling": self.pooling,
            "head_hidden": list(self.head_hidden),
            "value_hidden": self.value_hidden,
        }


class AlignmentPolicy(nn.Module):
    """ViT image + BERT text features, fused -> MLP -> Beta policy; separate value head.

    ``fusion``: ``concat`` ([image ; text]) or ``interaction`` ([u, v, |u - v|, u * v] of
    the two projected to ``fusion_dim``); the value head sees the same fused features.
    """

    kind: Kind = "alignment"

    def __init__(
        self,
        vit: ViTModel,
        text_encoder: nn.Module,
        tokenizer: Any,
        fusion_hidden: Sequence[int],
        value_hidden: int,
        max_length: int,
        pooling: str = "mean",
        fusion: str = "concat",
        fusion_dim: int = 64,
    ):
        super().__init__()
        _check_pooling(pooling)
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; allowed: {', '.join(FUSIONS)}")
        self.vit = vit
        self.pooling = pooling
        self.stem = _image_stem(vit)
        self.text_encoder = _drop_pooler(text_encoder)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.fusion_hidden = tuple(int(h) for h in fusion_hidden)
        self.value_hidden = int(value_hidden)
        self.fusion_kind = fusion
        self.fusion_dim = int(fusion_dim)
        image_dim = pooled_size(vit.config.hidden_size, pooling)
        text_dim = text_encoder.config.hidden_size
        if fusion == "interaction":
            self.image_proj = nn.Linear(image_dim, self.fusion_dim)
            self.text_proj = nn.Linear(text_dim, self.fusion_dim)
            fused = 4 * self.fusion_dim
        else:
            fused = image_dim + text_dim
        # concat, full preset: 1536 -> 768 -> 384, then the 2 Beta parameters
        self.fusion = _mlp(fused, self.fusion_hidden[:-1], self.fusion_hidden[-1])
        self.policy_head = BetaPolicyHead(self.fusion_hidden[-1], ())
        self.value_head = ValueHead(fused, self.value_hidden)

    @property
    def image_size(self) -> int:
        return int(self.vit.config.image_size)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        device = next(self.parameters()).device
        tok = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": tok["input_ids"].to(device),
            "attention_mask": tok["attention_mask"].to(device),
        }

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, vit hidden): the pooled ViT embedding."""
        return _pool(self.vit(pixel_values=self.stem(pixel_values)).last_hidden_state, self.pooling)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean of the text encoder's final token states: (B, text hidden)."""
        tokens = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def project_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image embedding -> unit vector in the shared space (interaction fusion only)."""
        return F.normalize(self.image_proj(image), dim=-1)

    def project_text(self, text: torch.Tensor) -> torch.Tensor:
        """Text embedding -> unit vector in the shared space (interaction fusion only)."""
        return F.normalize(self.text_proj(text), dim=-1)

    def fuse(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Tower embeddings -> the fused features the policy and value heads read."""
        if self.fusion_kind == "concat":
            return torch.cat([image, text], dim=-1)
        scale = math.sqrt(self.fusion_dim)
        u, v = self.project_image(image) * scale, self.project_text(text) * scale
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)

    def fused_features(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The fused features of (image, prompt) pairs (see ``fusion``)."""
        return self.fuse(
            self.image_features(pixel_values), self.text_features(input_ids, attention_mask)
        )

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> PolicyOutput:
        fused = self.fused_features(pixel_values, input_ids, attention_mask)
        alpha, beta = self.policy_head(F.gelu(self.fusion(fused)))
        return PolicyOutput(alpha, beta, self.value_head(fused))

    def inputs(self, images: Any, prompts: Sequence[str] | None) -> dict[str, torch.Tensor]:
        if prompts is None:
            raise ValueError("the alignment policy needs one prompt per image")
        pixels = prepare_images(images, self.image_size).to(next(self.parameters()).device)
        if len(prompts) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(prompts)} prompts")
        return {"pixel_values": pixels, **self.tokenize(prompts)}

    @torch.no_grad()
    def score(self, images: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Alignment scores in [0, 1], one per (image, prompt) pair (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            return self(**self.inputs(images, prompts)).mean
        finally:
            self.train(was_training)

    def architecture(self) -> dict[str, Any]:
        return {
            "vision": self.vit.config.to_dict(),
            "pooling": self.pooling,
            "text": self.text_encoder.config.to_dict(),
            "fusion_hidden": list(self.fusion_hidden),
            "value_hidden": self.value_hidden,
            "max_length": self.max_length,
            "fusion": self.fusion_kind,
            "fusion_dim": self.fusion_dim,
        }


RewardModel = QualitySelector | AlignmentPolicy


def build_selector(cfg: RewardsConfig) -> QualitySelector:
    """The selector of ``cfg``: ViT loaded or built, fresh heads."""
    return QualitySelector(
        build_vit(cfg.vision), cfg.selector_hidden, cfg.value_hidden, cfg.vision.pooling
    )


def build_alignment(cfg: RewardsConfig) -> AlignmentPolicy:
    """The alignment policy of ``cfg``: ViT and text encoder loaded or built, fresh heads."""
    text_cfg: TextEncoderConfig = cfg.text_encoder
    tokenizer = build_tokenizer(text_cfg)
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        log.warning(
            "the text tokenizer has no vocabulary besides its %d special tokens, so every "
            "prompt reads as [UNK] and the alignment policy cannot read text (with "
            "transformers 5, BertTokenizerFast takes the vocabulary as vocab=, not vocab_file=)",
            len(tokenizer),
        )
    text = build_text_encoder(text_cfg, vocab_size=len(tokenizer))
    return AlignmentPolicy(
        build_vit(cfg.vision),
        text,
        tokenizer,
        cfg.fusion_hidden,
        cfg.value_hidden,
        text_cfg.max_length,
        cfg.vision.pooling if cfg.alignment_pooling == "vision" else cfg.alignment_pooling,
        cfg.fusion,
        cfg.fusion_dim,
    )


# --------------------------------------------------------------------------- checkpoints


def save_reward_model(model: RewardModel, out: str | os.PathLike, **meta: Any) -> Path:
    """Write ``model`` to directory ``out``: safetensors weights + JSON config (+ tokenizer).

    ``meta`` (threshold, training statistics, the rewards config) is stored in the JSON.
    Written to a temporary sibling directory and renamed into place; an existing
    checkpoint at ``out`` is replaced only after the new one is complete.
    """
    out = Path(out)
    with staged_folder(out) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
        if isinstance(model, AlignmentPolicy):
            model.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        info = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "kind": model.kind,
            "architecture": model.architecture(),
            **meta,
        }
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, default=_json_default) + "\n")
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a reward model checkpoint directory (checked format and version)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: not a reward model checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not JSON ({exc})") from exc
    check_format(meta, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, str(meta_path),
                 "reward model checkpoint")  # fmt: skip
    if meta.get("kind") not in ("selector", "alignment"):
        raise ValueError(f"{meta_path}: unknown reward model kind {meta.get('kind')!r}")
    return meta


def load_reward_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> RewardModel:
    """Rebuild a saved selector or alignment policy (eval mode) from its directory."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    arch = meta["architecture"]
    vit = ViTModel(ViTConfig.from_dict(arch["vision"]), add_pooling_layer=False)
    if meta["kind"] == "selector":
        model: RewardModel = QualitySelector(
            vit, arch["head_hidden"], arch["value_hidden"], arch["pooling"]
        )
    else:
        text_dict = dict(arch["text"])
        text_cfg = AutoConfig.for_model(text_dict.pop("model_type"), **text_dict)
        text = AutoModel.from_config(text_cfg)
        tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
        model = AlignmentPolicy(
            vit,
            text,
            tokenizer,
            arch["fusion_hidden"],
            arch["value_hidden"],
            arch["max_length"],
            arch["pooling"],
            arch.get("fusion", "concat"),  # checkpoints before the interaction fusion
            arch.get("fusion_dim", 64),
        )
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS_FILE}: weights do not fit the stored architecture "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model.to(device).eval()


def load_selector(path: str | os.PathLike, device: str | torch.device = "cpu") -> QualitySelector:
    model = load_reward_model(path, device)
    if not isinstance(model, QualitySelector):
        raise ValueError(f"{path}: holds a {model.kind} model, not a selector")
    return model


def load_alignment(path: str | os.PathLike, device: str | torch.device = "cpu") -> AlignmentPolicy:
    model = load_reward_model(path, device)
    if not isinstance(model, AlignmentPolicy):
        raise ValueError(f"{path}: holds a {model.kind} model, not an alignment policy")
    return model


# --------------------------------------------------------------------------- reward


class RewardModels:
    """The reward the RL learner sees: ``score(images, prompts) -> dict of tensors``.

    ``quality`` (selector), ``alignment`` (policy), ``reward`` = the weighted mean
    (quality_weight * quality + alignment_weight * alignment) / (sum of weights), and
    ``passed`` = quality >= threshold. All are the models' outputs as computed.
    """

    def __init__(
        self,
        selector: QualitySelector,
        alignment: AlignmentPolicy,
        threshold: float,
        quality_weight: float = 0.5,
        alignment_weight: float = 0.5,
    ):
        if quality_weight < 0 or alignment_weight < 0 or quality_weight + alignment_weight <= 0:
            raise ValueError(
                f"reward weights must be >= 0 with a positive sum, got {quality_weight}, "
                f"{alignment_weight}"
            )
        self.selector, self.alignment = selector.eval(), alignment.eval()
        self.threshold = float(threshold)
        total = quality_weight + alignment_weight
        self.quality_weight, self.alignment_weight = (
            quality_weight / total,
            alignment_weight / total,
        )

    @torch.no_grad()
    def score(self, images: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        quality = self.selector.score(images)
        alignment = self.alignment.score(images, prompts)
        return {
            "quality": quality,
            "alignment": alignment,
            "reward": self.quality_weight * quality + self.alignment_weight * alignment,
            "passed": quality >= self.threshold,
        }

    @classmethod
    def load(cls, out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> RewardModels:
        """Load ``out_dir/selector`` and ``out_dir/alignment`` as written by train_rewards."""
        out_dir = Path(out_dir)
        selector = load_selector(out_dir / "selector", device)
        meta = read_checkpoint_meta(out_dir / "selector")
        weights = meta.get("reward_weights", {"quality": 0.5, "alignment": 0.5})
        return cls(
            selector,
            load_alignment(out_dir / "alignment", device),
            threshold=float(meta.get("threshold", 0.25)),
            quality_weight=float(weights["quality"]),
            alignment_weight=float(weights["alignment"]),
        )
