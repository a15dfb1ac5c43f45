"""Small stand-ins of the hub repositories the GPU preset names, in their hub layout.

``medrl dev make-standins DIR`` writes, with random weights (seeded) and small widths:

- ``DIR/stable-diffusion-v1-5``: a Stable Diffusion pipeline folder as the hub repository
  ``stable-diffusion-v1-5/stable-diffusion-v1-5`` lays it out (``model_index.json``;
  ``unet/``, ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/`` with their config
  files and safetensors), the same classes and block types as SD 1.5 (a 4-level
  ``UNet2DConditionModel`` with cross-attention in the first three levels, a 4-level
  ``AutoencoderKL`` with SD's latent scaling 0.18215, a CLIP text encoder and tokenizer,
  SD 1.5's ``PNDMScheduler`` configuration). Not included: ``safety_checker/`` and
  ``feature_extractor/`` (medrl loads neither; ``model_index.json`` lists them as null).
- ``DIR/BiomedBERT``: a BERT folder like
  ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext`` (``config.json``, an
  uncased biomedical WordPiece ``vocab.txt`` trained here on fundus report text, the
  tokenizer config, ``model.safetensors``).
- ``DIR/vit-base-patch16-224-in21k``: a ``ViTModel`` folder like
  ``google/vit-base-patch16-224-in21k`` (``config.json``, ``preprocessor_config.json``,
  ``model.safetensors``).

The UNet cross-attends to the BERT's hidden size, as SD 1.5's 768 fits BioMedBERT's.
``standin_overrides`` gives the preset keys that point at them: a cluster job can be
dry-run on a laptop, and ``tests/test_standins.py`` runs ``configs/fundus-sd15.yaml`` end
to end on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from runfiles import require_empty_folder, staged_folder

SD_DIR = "stable-diffusion-v1-5"
BERT_DIR = "BiomedBERT"
VIT_DIR = "vit-base-patch16-224-in21k"

#: hidden size of the BERT stand-in (= the UNet's cross_attention_dim, as 768 in SD 1.5)
HIDDEN = 32


def _biomedical_corpus() -> list[str]:
    """Fundus report sentences (the phantom's captions) and ophthalmic vocabulary."""
    import numpy as np

    from generators.phantom import prompt_for, sample_record

    rng = np.random.default_rng(0)
    lines = [prompt_for(sample_record(rng, f"c{i}")) for i in range(400)]
    lines += [
        "diabetic macular oedema edema with retinal thickening near the fovea",
        "neovascularisation of the disc and elsewhere, vitreous haemorrhage, tractional "
        "retinal detachment, panretinal photocoagulation scars",
        "age-related macular degeneration with drusen and geographic atrophy",
        "hypertensive retinopathy with arteriovenous nicking and flame haemorrhages",
        "central retinal vein occlusion, branch retinal artery occlusion, cotton wool spots",
        "optic disc cupping, glaucomatous optic neuropathy, peripapillary atrophy",
        "fundus photography, optical coherence tomography, fluorescein angiography",
    ]
    return lines


def _write_bert(out: Path, seed: int) -> None:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(_biomedical_corpus(), vocab_size=600, min_frequency=1)
    out.mkdir(parents=True)
    trainer.save_model(str(out))  # vocab.txt
    tok = BertTokenizerFast(vocab=str(out / "vocab.txt"), do_lower_case=True)
    tok.model_max_length = 512
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    model = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=512,
        )
    )
    model.save_pretrained(out, safe_serialization=True)


def _write_clip_vocab(out: Path) -> None:
    """vocab.json and merges.txt of a byte-level CLIP BPE with no merges (514 tokens)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())  # the 256 byte symbols of byte-level BPE
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")


def _clip_tokenizer(out: Path):
    """SD's tokenizer/: a CLIP tokenizer on that vocabulary."""
    from transformers import CLIPTokenizer

    _write_clip_vocab(out)
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)


def _write_sd(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from generators.model import assemble_pipeline

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,  # the byte-level vocabulary of _clip_tokenizer
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    scheduler = PNDMScheduler(  # SD 1.5's scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        trained_betas=None,
    )
    out.mkdir(parents=True)
    tokenizer = _clip_tokenizer(out / "tokenizer")  # vocab.json + merges.txt, as on the hub
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler)
    pipe.save_pretrained(out, safe_serialization=True)


def _write_vit(out: Path, seed: int) -> None:
    from transformers import ViTConfig, ViTModel

    try:  # transformers 5 without torchvision: the PIL processor (same preprocessor_config)
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor

    torch.manual_seed(seed)
    model = ViTModel(
        ViTConfig(
            image_size=64,
            patch_size=8,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)


def make_standins(out: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the three stand-in folders under ``out`` (atomically: a temporary directory,
    then renamed). Returns their paths by name (``sd``, ``bert``, ``vit``)."""
    out = require_empty_folder(out)
    with staged_folder(out) as tmp:
        _write_sd(tmp / SD_DIR, seed)
        _write_bert(tmp / BERT_DIR, seed + 1)
        _write_vit(tmp / VIT_DIR, seed + 2)
    return {"sd": out / SD_DIR, "bert": out / BERT_DIR, "vit": out / VIT_DIR}


def standin_overrides(root: str | os.PathLike) -> list[str]:
    """Config overrides that point the GPU preset's ``*.pretrained`` keys at the stand-ins
    (only paths: sizes, steps and resolution are the caller's)."""
    root = Path(root).resolve()
    sd, bert, vit = root / SD_DIR, root / BERT_DIR, root / VIT_DIR
    return [
        f"model.unet.pretrained={sd}",
        f"model.vae.pretrained={sd}",
        f"model.scheduler.pretrained={sd}",
        f"model.text_encoder.pretrained={bert}",
        f"rewards.vision.pretrained={vit}",
        f"rewards.text_encoder.pretrained={bert}",
    ]
