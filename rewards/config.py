"""Settings owned by the rewards package (composed into the run config by medrl as ``rewards``).

Both reward models are built tiny and random from these numbers (demo, tests) or load
their backbones from ``pretrained`` (a local directory or a hub id) with the same
classes (``ViTModel``, a BERT-family ``AutoModel``). Constraints live in field metadata
(``min``, ``max``) and ``Literal`` types; ``medrl.config`` enforces them and names the
key on error. The full-size preset is in docs/rewards.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from generators.config import TextEncoderConfig
from runfiles.config import setting


@dataclass(frozen=True)
class VisionConfig:
    """The ViT image encoder of both reward models (each model gets its own copy)."""

    pretrained: str | None = setting(
        None,
        "local dir or hub id of a ViTModel (e.g. google/vit-base-patch16-224-in21k); "
        "null: build from the sizes below",
    )
    subfolder: str | None = setting(None, "subfolder of `pretrained` holding the ViT")
    image_size: int = setting(
        64, "input side in pixels (built models; a loaded ViT keeps its own)", min=16
    )
    patch_size: int = setting(8, "patch side in pixels (built models; full preset: 16)", min=1)
    hidden_size: int = setting(64, "embedding size (built models; full preset: 768)", min=8)
    num_layers: int = setting(2, "transformer layers (built models; full preset: 6)", min=1)
    num_heads: int = setting(4, "attention heads (built models; full preset: 12)", min=1)
    intermediate_size: int = setting(
        128, "feed-forward size (built models; full preset: 3072)", min=8
    )
    pooling: Literal["mean", "cls"] = setting(
        "mean",
        "image embedding: mean of the final patch tokens (learns faster from scratch) or "
        "the [CLS] token",
    )
    detail_channels: bool | None = setting(
        None,
        "feed the ViT 3 extra channels |x - blur(x)| (per-pixel local detail, which a small "
        "ViT trained from scratch cannot learn through its linear patch embedding); "
        "null: on for built ViTs, off for pretrained (3-channel) ones",
    )

    @property
    def use_detail_channels(self) -> bool:
        return self.pretrained is None if self.detail_channels is None else self.detail_channels

    def __post_init__(self) -> None:
        if self.pretrained is not None and self.detail_channels:
            raise ValueError(
                "rewards.vision.detail_channels: a pretrained ViT takes 3 channels; set it "
                "to false or null with rewards.vision.pretrained"
            )
        if self.pretrained is None:
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"rewards.vision.image_size ({self.image_size}) must be divisible by "
                    f"rewards.vision.patch_size ({self.patch_size})"
                )
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"rewards.vision.hidden_size ({self.hidden_size}) must be divisible by "
                    f"rewards.vision.num_heads ({self.num_heads})"
                )


@dataclass(frozen=True)
class RewardsConfig:
    """The quality selector, the alignment policy and how they learn from ratings."""

    ratings_db: str = setting(
        "ratings/ratings.db", "SQLite ratings store, one per project (`medrl ratings ingest`)"
    )
    images_root: str = setting(
        "", "folder the ratings' image_path values are relative to; empty: beside the ratings"
    )
    vision: VisionConfig = field(default_factory=VisionConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    selector_hidden: tuple[int, ...] = setting(
        (64,), "MLP widths of the selector's score head (full preset: [384])", min=1
    )
    fusion: Literal["interaction", "concat"] = setting(
        "interaction",
        "how the alignment policy joins image and text: `interaction` projects both to "
        "fusion_dim and feeds [u, v, |u-v|, u*v] to the MLP (learns whether they match); "
        "`concat` feeds [image ; text] (the original fusion)",
    )
    alignment_pooling: Literal["grid", "mean", "cls", "vision"] = setting(
        "grid",
        "image embedding of the alignment policy: `grid` (the patch-token means of the four "
        "quadrants side by side: keeps which side the optic disc is on, i.e. the eye), "
        "`mean`, `cls`, or `vision` (as rewards.vision.pooling)",
    )
    fusion_dim: int = setting(
        64,
        "shared width d of the interaction fusion's projections (4 d features reach the MLP)",
        min=1,
    )
    fusion_hidden: tuple[int, ...] = setting(
        (64, 32),
        "MLP widths of the alignment policy after the fusion (full preset: [768, 384])",
        min=1,
    )
    value_hidden: int = setting(
        32, "hidden width of each model's separate value head (full preset: 384)", min=1
    )
    objective: Literal["reinforce", "regression"] = setting(
        "reinforce",
        "how the models learn: REINFORCE with a learned value baseline, or supervised "
        "regression of the mean score on the rating",
    )
    alignment_objective: Literal["same", "reinforce", "regression", "ranking"] = setting(
        "same",
        "objective of the alignment policy: `same` as rewards.objective, or its own: "
        "reinforce, regression (rewards.regression_loss), or ranking (BCE of the mean "
        "score plus a pairwise logistic loss that orders the batch's pairs by rating)",
    )
    compare_objectives: bool = setting(
        True, "also train the other objective and report both on the held-out ratings"
    )
    reward: Literal["absolute", "squared"] = setting(
        "absolute", "REINFORCE reward of a sampled score s for rating y: 1-|s-y| or 1-(s-y)^2"
    )
    regression_loss: Literal["mse", "bce"] = setting(
        "mse", "loss of the regression objective between the mean score and the rating"
    )
    lr: float = setting(
        2e-3,
        "AdamW peak learning rate (warm-up, cosine decay; ~2e-5 for pretrained backbones)",
        min=0.0,
    )
    weight_decay: float = setting(1e-2, "AdamW weight decay", min=0.0)
    epochs: int = setting(80, "selector epochs (all rated images)", min=1)
    stage1_epochs: int = setting(20, "alignment policy stage-1 epochs (all rated pairs)", min=1)
    stage2_epochs: int = setting(
        5, "alignment policy stage-2 epochs (pairs whose image passes the selector; 0: off)", min=0
    )
    batch_size: int = setting(32, "rated images per optimiser step", min=1)
    num_samples: int = setting(
        64, "scores drawn from the policy per image per step (REINFORCE)", min=1, max=1024
    )
    entropy_coef: float = setting(1e-2, "weight of the Beta entropy bonus (REINFORCE)", min=0.0)
    value_coef: float = setting(0.5, "weight of the value head's MSE loss (REINFORCE)", min=0.0)
    grad_clip: float = setting(1.0, "gradient norm clip (0: off)", min=0.0)
    threshold: float = setting(
        0.25,
        "selector score an image must reach to pass (stage 2, the pass/fail report); "
        "0.25 lies halfway between the normalised ratings poor (0) and fair (0.5)",
        min=0.0,
        max=1.0,
    )
    quality_weight: float = setting(
        0.5, "weight of the quality score in the combined reward", min=0.0
    )
    alignment_weight: float = setting(
        0.5, "weight of the alignment score in the combined reward", min=0.0
    )
    holdout_fraction: float = setting(
        0.2, "share of rated images held out for the report (split by image)", min=0.0, max=0.9
    )
    seed: int = setting(0, "seed of the split, the initialisation and the score samples", min=0)
    ood_weight: float = setting(
        0.5,
        "OOD guard (rewards/ood.py): reward taken off an image whose selector features lie "
        "twice as far from the rated pool as the pool's own ood_quantile distance (none "
        "inside it, linear in between); 0: off",
        min=0.0,
    )
    ood_quantile: float = setting(
        0.99, "share of the rated pool inside the OOD guard's edge", min=0.5, max=0.9999
    )
    pretrain_manifest: str = setting(
        "",
        "manifest (`medrl data ingest`) whose training-split image-text pairs pre-train "
        "the alignment policy's two towers contrastively before the ratings "
        "(rewards/contrastive.py); "
        "empty: no pre-training",
    )
    pretrain_epochs: int = setting(
        20, "contrastive pre-training epochs over the manifest (0: off)", min=0
    )
    pretrain_lr: float = setting(
        2e-3, "AdamW peak learning rate of the contrastive pre-training", min=0.0
    )
    pretrain_batch_size: int = setting(
        64, "image-text pairs per contrastive step (the in-batch negatives)", min=2
    )
    pretrain_temperature: float = setting(
        0.1, "InfoNCE temperature of the contrastive pre-training", min=1e-3, max=10.0
    )
    pretrain_flip: bool = setting(
        True,
        "every batch also holds each image mirrored left-right, paired with its prompt's eye "
        "swapped (a mirrored fundus is the other eye)",
    )
    pretrain_hard_weight: float = setting(
        1.0,
        "weight of the two-way loss 'true prompt vs its eye-swapped prompt' per image, "
        "added to the InfoNCE",
        min=0.0,
    )
    pretrain_grade_swap: bool = setting(
        True, "hard negatives with the DR grade words replaced, besides the swapped eye"
    )
    tower_lr_scale: float = setting(
        0.1,
        "learning-rate factor of the alignment policy's ViT and text encoder while it "
        "learns from the ratings after contrastive pre-training (keeps what it taught them)",
        min=0.0,
    )
    pretrain_cache: str = setting(
        "",
        "directory keeping contrastively pre-trained alignment towers, one file per hash of "
        "the pre-training pairs and the settings that shape them: a retraining with the same "
        "manifest and settings (the next rating round) loads them instead of pre-training "
        "again (empty: off)",
    )
    init_from: str = setting(
        "",
        "a previous `medrl rewards train` output directory: its selector and alignment "
        "policy (same architecture) are where this training starts, so a rating round "
        "continues the last round's models with fewer epochs instead of starting again "
        "(no contrastive pre-training: the towers come with them; the hold-out split is "
        "per image and stable, so held-out images stay unseen); empty: from scratch",
    )
    service_replicas: int = setting(
        1, "reward service actors (Ray) or Serve replicas scoring in parallel", min=1
    )
    service_num_gpus: float = setting(
        0.25,
        "GPU share of each reward service replica (fractional: several share one GPU); "
        "used only where the Ray cluster has GPUs, else replicas run on CPU",
        min=0.0,
        max=1.0,
    )
    service_batch_size: int = setting(
        64, "images the reward service scores per forward pass (mini-batch)", min=1
    )
    score_timeout_s: float = setting(
        600.0,
        "seconds a reward service replica with scoring calls waiting may go without "
        "answering one; then it is hung: killed, replaced by a fresh replica of the same "
        "reward, and its calls scored again (a batch that fails 3 times ends the run)",
        min=0.1,
    )
    service_start_timeout_s: float = setting(
        600.0,
        "seconds a reward service replica may take to start (placed on the cluster, "
        "reward loaded); longer is an error",
        min=0.1,
    )

    def __post_init__(self) -> None:
        if self.quality_weight + self.alignment_weight <= 0:
            raise ValueError(
                "rewards.quality_weight + rewards.alignment_weight must be > 0 "
                f"(got {self.quality_weight} and {self.alignment_weight})"
            )
