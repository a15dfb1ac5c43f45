"""The GPU check: SD 1.5-sized sampling and learning speed with random weights, as JSON.

    bash benchmarks/gpu_check.sh               # on one GPU (about 3-6 minutes)
    bash benchmarks/gpu_check.sh --cpu-smoke   # the same code path, tiny sizes, on a CPU

Builds the preset's architecture (configs/fundus-sd15.yaml: Stable Diffusion 1.5's UNet
and VAE, a BERT-base text encoder of BioMedBERT's size; the published configs in
benchmarks/memory_plan.py) with random weights, no download, at the preset's resolution,
sampling steps, guidance and LoRA, and times with medrl's own classes:

- ``sampler_images_per_s``: :class:`rl.samplers.Sampler` drawing ``sampling.batch_size``
  images with DDIM log-probabilities (the RL samplers' work), after a warm-up batch;
- ``learner_samples_per_s``: one :meth:`rl.learner.Learner.train` update (DeepSpeed,
  ZeRO ``rl.zero_stage``, every DDIM step of every sample) on those trajectories;
- ``end_to_end_samples_per_s``: both in turn, the synchronous loop's rate on one GPU
  (1 / (1 / sampling + 1 / learning)), against ``target_samples_per_s`` 2.2 (issue 11:
  about ten times the published DDPO reference's rate per A100).

Sampler and learner share the one GPU: about 5.7 + 20 GiB at the preset's
``rl.micro_batch`` 4 (benchmarks/memory_plan.py); on a 24 GB card add ``rl.micro_batch=2``.

``--cpu-smoke`` runs the same path with a tiny UNet (the stand-ins' widths), 64 px and
4 steps on the CPU: what the test runs. Any ``key=value`` overrides the preset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TARGET = 2.2
SMOKE = [
    "model.resolution=64",
    "sampling.num_steps=4",
    "sampling.batch_size=2",
    "rl.micro_batch=2",
    "rl.prompts_per_iteration=1",
    "rl.group_size=2",
]
PROMPT = "colour fundus photograph, left eye, moderate non-proliferative diabetic retinopathy"


def build(cfg, smoke: bool):
    """The generator of the preset's architecture, random weights (meta-free: real tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from memory_plan import KNOWN
    from transformers import BertConfig, BertModel

    from generators.model import Generator, assemble_pipeline, build_scheduler, build_tokenizer

    sd = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    unet_cfg, vae_cfg = dict(KNOWN[(sd, "unet")]), dict(KNOWN[(sd, "vae")])
    text_cfg = dict(KNOWN[("microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext", None)])
    if smoke:  # the stand-ins' widths (medrl/standins.py)
        unet_cfg.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1,
                        cross_attention_dim=32)  # fmt: skip
        vae_cfg.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1)
        text_cfg.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    tok_cfg = replace(cfg.model.text_encoder, pretrained=None, tokenizer=None,
                      tokenizer_subfolder=None, max_length=77)  # fmt: skip
    tokenizer = build_tokenizer(tok_cfg)
    text = BertModel(BertConfig(**text_cfg), add_pooling_layer=False)
    text.config.use_attention_mask = True
    sched_cfg = replace(cfg.model.scheduler, pretrained=None)
    pipe = assemble_pipeline(
        UNet2DConditionModel.from_config(unet_cfg),
        AutoencoderKL.from_config(vae_cfg),
        text,
        tokenizer,
        build_scheduler(sched_cfg),
    )
    return Generator(pipe=pipe, resolution=cfg.model.resolution)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    from medrl.config import load_config
    from rl.learner import Learner
    from rl.samplers import Sampler, SampleRequest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--config", default=str(ROOT / "configs" / "fundus-sd15.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    overrides = [*(SMOKE if args.cpu_smoke else []), *args.overrides]
    cfg = load_config(args.config, ["model.text_encoder.max_length=77", *overrides])
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("gpu_check: no GPU visible (use --cpu-smoke on a CPU)")
    if device.type == "cuda":  # as Ray Train does on GPUs: ZeRO's collectives need NCCL
        from rl.learner import init_single_process_group

        init_single_process_group("nccl")
    t0 = time.perf_counter()
    gen = build(cfg, args.cpu_smoke)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        gen_dir = gen.save(Path(tmp) / "generator")
        del gen
        build_s = time.perf_counter() - t0
        s = cfg.sampling
        sampler = Sampler(str(gen_dir), cfg.lora, s, device=str(device))
        learner = Learner(gen_dir, cfg.lora, s, cfg.rl, device=device, seed=0)
    n = s.batch_size
    requests = [SampleRequest(f"s{i}", PROMPT, i) for i in range(n)]
    state = [learner.adapter_state()]  # the learner's adapter, as the loop sends it
    sampler.sample(requests, version=0, adapter=state)  # warm-up (kernels, allocator)
    _sync(device)
    t1 = time.perf_counter()
    traj = sampler.sample([replace(r, seed=r.seed + n) for r in requests], 0, state)
    _sync(device)
    sample_s = time.perf_counter() - t1
    adv = torch.linspace(-1, 1, n)
    batch = traj.for_learner(adv, keep=range(n))
    learner.train(batch, iteration=0, seed=0)  # warm-up
    _sync(device)
    t2 = time.perf_counter()
    stats = learner.train(batch, iteration=1, seed=0)
    _sync(device)
    learn_s = time.perf_counter() - t2
    img_rate, learn_rate = n / sample_s, n / learn_s
    e2e = 1.0 / (1.0 / img_rate + 1.0 / learn_rate)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "smoke": args.cpu_smoke,
        "resolution": cfg.model.resolution,
        "num_steps": s.num_steps,
        "guidance_scale": s.guidance_scale,
        "batch": n,
        "lora_rank": cfg.lora.rank,
        "micro_batch": cfg.rl.micro_batch,
        "unet_parameters_m": round(sum(p.numel() for p in learner.gen.unet.parameters()) / 1e6, 1),
        "build_and_load_s": round(build_s, 1),
        "sampler_images_per_s": round(img_rate, 4),
        "learner_samples_per_s": round(learn_rate, 4),
        "end_to_end_samples_per_s": round(e2e, 4),
        "target_samples_per_s": TARGET,
        "end_to_end_over_target": round(e2e / TARGET, 4),
        "learner_updates": stats.get("updates"),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
