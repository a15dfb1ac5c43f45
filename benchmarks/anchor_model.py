"""The reference kit's fixed tiny model (``../shared/anchors/anchor_config.py``), rebuilt here.

Users of medrl do not have the kit, so its numbers are copied below and the model is built
with the same diffusers / transformers classes, in the kit's order after
``torch.manual_seed(0)`` (UNet, VAE, text encoder), and saved as a medrl generator
directory (:meth:`generators.model.Generator.save`). With the kit's torch version the
tensors are bit-identical to the kit's: :func:`tensor_digests` is the kit's digest and
:func:`check_against_kit` compares it with the kit's ``pipeline_manifest.json`` when the kit
is present. Only the tokenizer class differs (the fast WordPiece tokenizer over the same
vocabulary; same ids for the kit's prompts).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

SEED = 0
UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=64,
)
TEXT_ENCODER = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=77,
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)]
MAX_LENGTH = 77
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
RESOLUTION = 64
#: sampling: batch 8, 10 DDIM steps, eta 1, CFG 5 (UNet batch 16)
BATCH, STEPS, ETA, GUIDANCE = 8, 10, 1.0, 5.0
#: trl 0.23.1's DDPO LoRA: r 4, alpha 4, gaussian init, attention projections
LORA = dict(r=4, lora_alpha=4, init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"])  # fmt: skip
#: the kit's 8 benchmark prompts
PROMPTS = [f"w{3 * i + 1} w{3 * i + 2} w{3 * i + 3}" for i in range(8)]
#: trl 0.23.1 DDPOConfig of the kit, as medrl's rl.* keys: 8 samples x 10 timesteps, one
#: AdamW step (lr 3e-4, weight decay 1e-4), clip 1e-4, advantages clipped at 5, grad norm 1
RL_KEYS = dict(
    micro_batch=8,
    updates_per_epoch=1,
    inner_epochs=1,
    timestep_fraction=1.0,
    min_noise_std=0.0,
    lr=3e-4,
    weight_decay=1e-4,
    clip_range=1e-4,
    adv_clip=5.0,
    grad_clip=1.0,
    kl_weight=0.0,
    prompts_per_iteration=8,
    group_size=2,
)


def build_anchor_generator(out: Path) -> Path:
    """Build the kit's model and save it as a medrl generator directory at ``out``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from generators.model import Generator, assemble_pipeline

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE)
    text_encoder = BertModel(BertConfig(**TEXT_ENCODER))
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.txt"
        vocab.write_text("\n".join(VOCAB) + "\n")
        tokenizer = BertTokenizerFast(vocab=str(vocab), model_max_length=MAX_LENGTH)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, DDIMScheduler(**SCHEDULER))
    for m in (unet, vae, text_encoder):
        m.eval()
    return Generator(pipe=pipe, resolution=RESOLUTION).save(out)


def tensor_digests(pipe) -> dict[str, str]:
    """The kit's digest: sha256 over (name, dtype, shape, bytes) of every tensor, per part."""
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        h = hashlib.sha256()
        sd = getattr(pipe, name).state_dict()
        for k in sorted(sd):
            t = sd[k].detach().contiguous().cpu()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def check_against_kit(gen_dir: Path, kit: Path | None) -> str:
    """Compare the saved model's tensors with the kit's manifest; a sentence saying how."""
    from generators.model import load_generator

    manifest = kit / "pipeline_manifest.json" if kit else None
    if manifest is None or not manifest.is_file():
        return "kit not found: weights not compared with its manifest"
    want = json.loads(manifest.read_text())
    got = tensor_digests(load_generator(gen_dir).pipe)
    bad = [k for k, v in want["digests"].items() if got.get(k) != v]
    if not bad:
        return f"weights identical to the kit's ({manifest})"
    return (
        f"weights of {bad} differ from {manifest} (built with torch {want.get('torch')}, "
        f"this is {torch.__version__}): a different RNG stream; timings do not depend on it"
    )
