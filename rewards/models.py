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
config (``QualitySelector.from_config(cfg)``, ``AlignmentPolicy.from_config(cfg)``);
``model.save_pretrained(dir)`` / ``Cls.from_pretrained(dir)`` write and read a
checkpoint directory (``model.safetensors`` + ``reward_model.json`` [+ ``tokenizer/``])
that rebuilds the same model with no network access.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, ViTConfig, ViTModel

from generators.config import TextEncoderConfig
from generators.model import build_text_encoder, build_tokenizer
from rewards.config import RewardsConfig
from rewards.towers import (
    BetaPolicyHead,
    PolicyOutput,
    ValueHead,
    build_vit,
    check_pooling,
    drop_pooler,
    image_stem,
    mlp,
    pool_tokens,
    pooled_size,
    prepare_images,
)
from runfiles import check_format, staged_folder

CHECKPOINT_FORMAT = "medrl-reward-model"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "reward_model.json"
TOKENIZER_DIR = "tokenizer"
Kind = Literal["selector", "alignment"]
FUSIONS = ("concat", "interaction")

log = logging.getLogger(__name__)


class RewardModel(nn.Module):
    """What the selector and the alignment policy share: the diffusers shape of a model.

    ``Cls.from_config(rewards_cfg)`` builds one (ViT and text encoder loaded from
    ``*.pretrained`` or built from sizes, fresh heads); ``model.save_pretrained(dir,
    **meta)`` writes safetensors weights, the architecture and ``meta`` as JSON (and the
    tokenizer), committed in one step; ``Cls.from_pretrained(dir, device)`` rebuilds it in
    eval mode (``RewardModel.from_pretrained`` reads either kind).
    """

    kind: Kind

    @classmethod
    def from_config(cls, cfg: RewardsConfig) -> RewardModel:
        raise NotImplementedError

    @classmethod
    def _from_architecture(cls, arch: dict[str, Any], path: Path) -> RewardModel:
        raise NotImplementedError

    def architecture(self) -> dict[str, Any]:
        raise NotImplementedError

    def save_pretrained(self, out: str | os.PathLike, **meta: Any) -> Path:
        """Write the model to directory ``out``: safetensors weights + JSON config (+
        tokenizer). ``meta`` (threshold, training statistics, the rewards config) is
        stored in the JSON. An existing checkpoint at ``out`` is replaced only after the
        new one is complete (runfiles.staged_folder)."""
        out = Path(out)
        with staged_folder(out) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
            tokenizer = getattr(self, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            info = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "kind": self.kind,
                "architecture": self.architecture(),
                **meta,
            }
            text = json.dumps(info, indent=2, default=_json_default) + "\n"
            (tmp / META_FILE).write_text(text)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        """Rebuild a saved model (eval mode) from its directory; a directory holding the
        other kind is a ValueError naming it."""
        path = Path(path)
        meta = read_checkpoint_meta(path)
        kinds = {"selector": QualitySelector, "alignment": AlignmentPolicy}
        model_cls = kinds[meta["kind"]]
        if cls is not RewardModel and model_cls is not cls:
            wanted = "a selector" if cls is QualitySelector else "an alignment policy"
            raise ValueError(f"{path}: holds a {meta['kind']} model, not {wanted}")
        model = model_cls._from_architecture(meta["architecture"], path)
        state = load_file(str(path / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path / WEIGHTS_FILE}: weights do not fit the stored architecture "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        return model.to(device).eval()


class QualitySelector(RewardModel):
    """ViT -> image embedding -> Beta policy head (quality score) and a separate value head."""

    kind: Kind = "selector"

    def __init__(
        self, vit: ViTModel, head_hidden: Sequence[int], value_hidden: int, pooling: str = "mean"
    ):
        super().__init__()
        check_pooling(pooling)
        self.vit = vit
        self.pooling = pooling
        self.stem = image_stem(vit)
        dim = pooled_size(vit.config.hidden_size, pooling)
        self.head_hidden = tuple(int(h) for h in head_hidden)
        self.value_hidden = int(value_hidden)
        self.policy_head = BetaPolicyHead(dim, self.head_hidden)
        self.value_head = ValueHead(dim, self.value_hidden)

    @classmethod
    def from_config(cls, cfg: RewardsConfig) -> QualitySelector:
        """The selector of ``cfg``: ViT loaded or built, fresh heads."""
        return cls(build_vit(cfg.vision), cfg.selector_hidden, cfg.value_hidden, cfg.vision.pooling)

    @classmethod
    def _from_architecture(cls, arch: dict[str, Any], path: Path) -> QualitySelector:
        vit = ViTModel(ViTConfig.from_dict(arch["vision"]), add_pooling_layer=False)
        return cls(vit, arch["head_hidden"], arch["value_hidden"], arch["pooling"])

    @property
    def image_size(self) -> int:
        return int(self.vit.config.image_size)

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`features` (generators.feature_align's expert)."""
        return pooled_size(self.vit.config.hidden_size, self.pooling)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B, hidden): pooled final-LayerNorm tokens."""
        return pool_tokens(
            self.vit(pixel_values=self.stem(pixel_values)).last_hidden_state, self.pooling
        )

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


class AlignmentPolicy(RewardModel):
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
        check_pooling(pooling)
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; allowed: {', '.join(FUSIONS)}")
        self.vit = vit
        self.pooling = pooling
        self.stem = image_stem(vit)
        self.text_encoder = drop_pooler(text_encoder)
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
        self.fusion = mlp(fused, self.fusion_hidden[:-1], self.fusion_hidden[-1])
        self.policy_head = BetaPolicyHead(self.fusion_hidden[-1], ())
        self.value_head = ValueHead(fused, self.value_hidden)

    @classmethod
    def from_config(cls, cfg: RewardsConfig) -> AlignmentPolicy:
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
        return cls(
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

    @classmethod
    def _from_architecture(cls, arch: dict[str, Any], path: Path) -> AlignmentPolicy:
        vit = ViTModel(ViTConfig.from_dict(arch["vision"]), add_pooling_layer=False)
        text_dict = dict(arch["text"])
        text_cfg = AutoConfig.for_model(text_dict.pop("model_type"), **text_dict)
        return cls(
            vit,
            AutoModel.from_config(text_cfg),
            AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR)),
            arch["fusion_hidden"],
            arch["value_hidden"],
            arch["max_length"],
            arch["pooling"],
            arch.get("fusion", "concat"),  # checkpoints before the interaction fusion
            arch.get("fusion_dim", 64),
        )

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
        return pool_tokens(
            self.vit(pixel_values=self.stem(pixel_values)).last_hidden_state, self.pooling
        )

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


# --------------------------------------------------------------------------- checkpoints


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
        selector = QualitySelector.from_pretrained(out_dir / "selector", device)
        meta = read_checkpoint_meta(out_dir / "selector")
        weights = meta.get("reward_weights", {"quality": 0.5, "alignment": 0.5})
        return cls(
            selector,
            AlignmentPolicy.from_pretrained(out_dir / "alignment", device),
            threshold=float(meta.get("threshold", 0.25)),
            quality_weight=float(weights["quality"]),
            alignment_weight=float(weights["alignment"]),
        )
