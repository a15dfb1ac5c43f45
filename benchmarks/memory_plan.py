"""Memory plan of a preset on GPUs: what a sampler actor and a learner rank need, and how
many sampler actors fit a 24, 40 and 80 GB GPU.

    python benchmarks/memory_plan.py --config configs/fundus-sd15.yaml
    python benchmarks/memory_plan.py --config configs/fundus-sd15.yaml --check   # on a CPU

No weights are downloaded and no memory is spent: every model is built on PyTorch's
``meta`` device from its architecture (a local ``pretrained`` folder's config.json, or,
for the preset's hub ids, the published configs below), and one training forward of the
UNet runs there with ``torch.autograd.graph.saved_tensors_hooks`` counting the bytes
autograd keeps for the backward pass: the activation memory, exactly as autograd would
hold it, per image (under classifier-free guidance a training sample is two UNet rows,
conditional and unconditional, as in the learner).

Attention: on the meta device PyTorch takes the math path of scaled-dot-product attention,
which keeps every (tokens x tokens) probability matrix; the fused kernels a GPU uses
(flash / memory-efficient SDPA) keep only the outputs and a log-sum-exp. The table gives
the fused figure and the math figure apart.

Gradient checkpointing (diffusers' ``enable_gradient_checkpointing``, one checkpoint per
UNet block): the forward keeps the blocks' inputs only, and the backward recomputes one
block at a time, so its activation memory is the checkpointed forward's plus the largest
single block's.

``--check`` measures the stand-ins' real memory on this CPU (``medrl dev make-standins``:
the preset's architecture families at small widths): the resident-set growth of a
training forward whose graph is kept, against the formula's fused figure for the same
model, batch and resolution, and prints the ratio.

What the numbers leave out: the CUDA context and allocator fragmentation (a fixed
``--overhead-gb``, 1.0 by default), the reward service (its own actors), the DeepSpeed
communication buckets.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
#: architecture configs of the GPU preset's hub ids, from their published config.json
#: files (written here from the model cards, not downloaded: BioMedBERT as BERT-base with
#: the 30522-token vocabulary; a local folder's config.json takes precedence)
KNOWN = {
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "unet"): {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
    },
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "vae"): {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32,
        "sample_size": 512,
    },
    ("microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext", None): {
        "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
    },
    ("google/vit-base-patch16-224-in21k", None): {
        "image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "intermediate_size": 3072,
    },
}  # fmt: skip
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _architecture(pretrained: str | None, subfolder: str | None, kind: str) -> dict | None:
    """config.json of a local folder, the published config of a known hub id, else None."""
    if not pretrained:
        return None
    folder = Path(pretrained) / (subfolder or "")
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text())
    key = (pretrained, subfolder if kind in ("unet", "vae") else None)
    if key in KNOWN:
        return dict(KNOWN[key])
    raise SystemExit(
        f"memory_plan: {pretrained} ({kind}) is neither a local folder with config.json nor "
        f"one of the known hub ids {sorted({k[0] for k in KNOWN})}"
    )


def _meta_models(cfg):
    """UNet, VAE and text encoder of ``cfg.model`` on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BertConfig, BertModel

    from generators.model import build_generator

    m = cfg.model
    unet_cfg = _architecture(m.unet.pretrained, m.unet.subfolder, "unet")
    vae_cfg = _architecture(m.vae.pretrained, m.vae.subfolder, "vae")
    text_cfg = _architecture(m.text_encoder.pretrained, m.text_encoder.subfolder, "text")
    with torch.device("meta"):
        if unet_cfg is None or vae_cfg is None or text_cfg is None:
            from dataclasses import replace

            built = build_generator(  # the config's own built parts (demo, tests)
                replace(m, unet=replace(m.unet, pretrained=None), vae=replace(m.vae, pretrained=None),
                        text_encoder=replace(m.text_encoder, pretrained=None, tokenizer=None,
                                             tokenizer_subfolder=None)),
            )  # fmt: skip
        unet = UNet2DConditionModel.from_config(unet_cfg) if unet_cfg else built.unet
        vae = AutoencoderKL.from_config(vae_cfg) if vae_cfg else built.vae
        text = (BertModel(BertConfig(**{k: v for k, v in text_cfg.items() if not k.startswith("_")}))
                if text_cfg else built.text_encoder)  # fmt: skip
    return unet, vae, text


def _numel(module, trainable_only=False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lora_count(unet, lora_cfg, keep: bool = False) -> int:
    """Parameters of a LoRA of ``lora_cfg`` on ``unet`` (attached, counted; kept with
    ``keep``: the training forward then sends gradients to it as the learner's does)."""
    from generators.lora import attach_lora

    attach_lora(unet, lora_cfg)
    n = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    if not keep:
        unet.delete_adapters("default")
    return n


def _is_attention_matrix(t: torch.Tensor) -> bool:
    """(..., N, N) with N >= 64: a self-attention probability (or score) matrix."""
    return t.dim() >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= 64


def activation_bytes(
    unet, rows: int, latent: int, text_len: int, dtype: torch.dtype, checkpointing: bool
) -> dict[str, float]:
    """Bytes autograd keeps for one training forward of ``rows`` UNet rows (grad reaching
    LoRA weights everywhere); with ``checkpointing`` plus the largest block's recompute.

    Returns fused (attention matrices not kept, as fused SDPA kernels do) and math bytes.
    """
    device = next(unet.parameters()).device
    unet.to(dtype)
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    per_block: dict[int, list[float]] = {i: [0.0, 0.0] for i in range(len(blocks))}
    totals = [0.0, 0.0]  # fused, attention matrices
    current: list[int | None] = [None]
    seen: set[int] = set()

    params = {id(p) for p in unet.parameters()}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t  # a view shares its base's memory
        if id(base) not in params and id(base) not in seen:  # weights are not activations
            seen.add(id(base))
            t = base
            b = t.numel() * t.element_size()
            slot = 1 if _is_attention_matrix(t) else 0
            totals[slot] += b
            if current[0] is not None:
                per_block[current[0]][slot] += b
        return t

    handles = []
    for i, blk in enumerate(blocks):
        handles.append(blk.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        handles.append(blk.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    x = torch.randn(rows, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    ctx = torch.randn(rows, text_len, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.full((rows,), 500, device=device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(x, t, encoder_hidden_states=ctx).sample
        kept = [totals[0] + out.numel() * out.element_size(), totals[1]]
        if checkpointing:  # the backward recomputes one block at a time, all its saves live
            unet.disable_gradient_checkpointing()
            totals[:] = [0.0, 0.0]
            seen.clear()
            for v in per_block.values():
                v[:] = [0.0, 0.0]
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                unet(x, t, encoder_hidden_states=ctx)
            kept[0] += max(v[0] for v in per_block.values())
            kept[1] += max(v[1] for v in per_block.values())
        block = max(v[0] for v in per_block.values())
    finally:
        for h in handles:
            h.remove()
        unet.disable_gradient_checkpointing()
        unet.eval()
    # block: the largest block's activations, about what the backward's gradients of the
    # activations hold at once on top of what is kept (the learner's peak adds it)
    return {"fused": kept[0], "math": kept[0] + kept[1], "block": block}


def inference_peak_bytes(module_forward, modules) -> float:
    """Largest input + output of any leaf module in one no-grad forward (what must be live
    at once, beside the weights), on the meta device."""
    peak = [0.0]

    def hook(m, args, out):
        size = lambda t: t.numel() * t.element_size() if torch.is_tensor(t) else 0  # noqa: E731
        outs = out if isinstance(out, (tuple, list)) else [getattr(out, "sample", out)]
        b = sum(size(a) for a in args) + sum(size(o) for o in outs)
        peak[0] = max(peak[0], b)

    handles = [m.register_forward_hook(hook) for m in modules if not list(m.children())]
    try:
        with torch.no_grad():
            module_forward()
    finally:
        for h in handles:
            h.remove()
    return peak[0]


def plan(cfg, overhead_gb: float = 1.0, world: int = 1) -> dict:
    """The numbers of the table for ``cfg`` (a medrl RunConfig)."""
    unet, vae, text = _meta_models(cfg)
    res = cfg.model.resolution
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = res // factor
    text_len = cfg.model.text_encoder.max_length
    params = {"unet": _numel(unet), "vae": _numel(vae), "text_encoder": _numel(text)}
    lora_ft = lora_count(unet, cfg.finetune.lora)
    lora_rl = lora_count(unet, cfg.lora, keep=True)  # the learner's adapter, trained below
    act = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        for ckpt in (False, True):
            act[(name, ckpt)] = activation_bytes(unet, 2, latent, text_len, dtype, ckpt)
    unet.to(torch.float32)

    s = cfg.sampling
    rows = 2 * s.batch_size  # CFG: conditional and unconditional rows
    x = torch.randn(rows, 4, latent, latent, device="meta")
    ctx = torch.randn(rows, text_len, unet.config.cross_attention_dim, device="meta")
    sampler = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        unet.to(dtype)
        vae.to(dtype)
        u_peak = inference_peak_bytes(
            lambda dtype=dtype: unet(x.to(dtype), torch.full((rows,), 500, device="meta"),
                                     encoder_hidden_states=ctx.to(dtype)),
            unet.modules(),
        )  # fmt: skip
        z = torch.randn(1, 4, latent, latent, device="meta", dtype=dtype)
        v_peak = inference_peak_bytes(lambda z=z: vae.decode(z), vae.modules())  # per image
        weights = sum(params.values()) * BYTES[name]
        traj = (s.num_steps + 1) * s.batch_size * 4 * latent * latent * 4  # fp32 latents
        sampler[name] = weights + max(u_peak, v_peak) + traj + overhead_gb * GIB
    unet.to(torch.float32)
    vae.to(torch.float32)

    mb = cfg.rl.micro_batch
    learner = {}
    for name in ("float32", "bfloat16"):
        weights = sum(params.values()) * BYTES[name]
        # LoRA: fp32 master weights, fp32 grads and Adam's two moments; ZeRO-2 shards the
        # gradients and optimizer states over the ranks, the weights stay whole
        lora = lora_rl * 4 * (1 + 3 / world) + (lora_rl * 2 if name != "float32" else 0)
        for ckpt in (False, True):
            a = act[(name, ckpt)]["fused"] * mb + act[(name, ckpt)]["block"] * mb
            learner[(name, ckpt)] = weights + lora + a + overhead_gb * GIB
    return {
        "resolution": res,
        "latent": latent,
        "text_len": text_len,
        "params": params,
        "lora_rl": lora_rl,
        "lora_rl_rank": cfg.lora.rank,
        "lora_ft": lora_ft,
        "lora_ft_rank": cfg.finetune.lora.rank,
        "activations_per_image": act,
        "sampler": sampler,
        "learner": learner,
        "micro_batch": mb,
        "sampler_batch": s.batch_size,
        "overhead_gb": overhead_gb,
        "world": world,
    }


def table(p: dict) -> str:
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    m = lambda n: f"{n / 1e6:.1f} M"  # noqa: E731
    lines = [
        f"resolution {p['resolution']} px (latent {p['latent']}x{p['latent']}), text "
        f"{p['text_len']} tokens, learner micro-batch {p['micro_batch']} samples (x2 rows "
        f"under CFG), sampler batch {p['sampler_batch']}, ZeRO-2 over {p['world']} learner "
        f"rank(s), {p['overhead_gb']:.1f} GiB context/fragmentation per process",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| parameters: UNet / VAE / text encoder | {m(p['params']['unet'])} / "
        f"{m(p['params']['vae'])} / {m(p['params']['text_encoder'])} |",
        f"| LoRA parameters: RL adapter (rank {p['lora_rl_rank']}) / fine-tuning adapter "
        f"(rank {p['lora_ft_rank']}) | {m(p['lora_rl'])} / {m(p['lora_ft'])} |",
    ]
    for name in ("float32", "bfloat16"):
        for ckpt in (False, True):
            a = p["activations_per_image"][(name, ckpt)]
            lines.append(
                f"| activations per training image, {name}, "
                f"{'with' if ckpt else 'without'} gradient checkpointing | {g(a['fused'])} GiB "
                f"(math attention: {g(a['math'])} GiB) |"
            )
    for name in ("float32", "bfloat16"):
        lines.append(f"| sampler actor, {name} weights | {g(p['sampler'][name])} GiB |")
    for name in ("float32", "bfloat16"):
        for ckpt in (False, True):
            lines.append(
                f"| learner rank, {name}, {'with' if ckpt else 'without'} checkpointing, "
                f"micro-batch {p['micro_batch']} | {g(p['learner'][(name, ckpt)])} GiB |"
            )
    fits = []
    for gb in (24, 40, 80):
        n = {k: int(gb * 1e9 // v) for k, v in p["sampler"].items()}
        fits.append(f"{gb} GB: {n['float32']} (float32) / {n['bfloat16']} (bfloat16)")
    lines.append(f"| sampler actors per GPU | {'; '.join(fits)} |")
    return "\n".join(lines)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def check(resolution: int = 256, rows: int = 2) -> float:
    """Real resident memory of a training forward of the stand-ins' UNet (graph kept),
    against the formula for it; returns measured / predicted."""
    from diffusers import UNet2DConditionModel

    from generators.config import LoraConfig
    from generators.lora import attach_lora
    from medrl.standins import SD_DIR, make_standins

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        make_standins(Path(tmp) / "hub")
        folder = Path(tmp) / "hub" / SD_DIR / "unet"
        config = json.loads((folder / "config.json").read_text())
        real = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True)
    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(config)
    latent, text_len = resolution // 8, 77
    for u in (real, meta):
        attach_lora(u, LoraConfig(rank=4))
    predicted = activation_bytes(meta, rows, latent, text_len, torch.float32, False)["fused"]
    real.train()
    x = torch.randn(rows, 4, latent, latent)
    ctx = torch.randn(rows, text_len, real.config.cross_attention_dim)
    t = torch.full((rows,), 500)
    with torch.no_grad():  # warm up the allocator and the kernels
        real(x, t, encoder_hidden_states=ctx)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap back to the OS so
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the growth below is new allocations only
    before = _rss()
    out = real(x, t, encoder_hidden_states=ctx).sample
    measured = _rss() - before
    del out
    ratio = measured / predicted
    print(
        f"check on the stand-in UNet ({_numel(real) / 1e6:.1f} M parameters), {resolution} px, "
        f"{rows} rows, float32: resident memory grew {measured / 2**20:.0f} MiB during a "
        f"training forward; the formula says {predicted / 2**20:.0f} MiB; measured / "
        f"predicted = {ratio:.2f}"
    )
    return ratio


def main() -> None:
    import diffusers

    from medrl.config import load_config

    diffusers.utils.logging.set_verbosity_error()  # "modules kept in float32": none here

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fundus-sd15.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--world", type=int, default=1, help="learner ranks (ZeRO-2 shards)")
    parser.add_argument("--overhead-gb", type=float, default=1.0)
    parser.add_argument("--check", action="store_true", help="measure the stand-ins on CPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    p = plan(cfg, overhead_gb=args.overhead_gb, world=args.world)
    if args.json:
        print(json.dumps({k: (str(v) if isinstance(v, dict) else v) for k, v in p.items()}))
    else:
        print(f"memory plan of {args.config} {' '.join(args.overrides)}".strip())
        print(table(p))
    if args.check:
        ratio = check()
        if not 0.7 <= ratio <= 1.4:
            raise SystemExit(f"memory_plan: the formula is off by {ratio:.2f}x on the stand-ins")


if __name__ == "__main__":
    main()
