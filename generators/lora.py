"""LoRA on the UNet (``lora.target_modules``), through peft; export for diffusers and kohya.

- :func:`attach_lora` adds a peft adapter (``unet.add_adapter``) to the modules named by
  ``lora.target_modules`` (attention projections and resnet convolutions by default),
  B = 0 so outputs are unchanged until it trains;
- :func:`get_adapter_state` / :func:`set_adapter_state` move adapter weights only (what
  the RL loop sends to its samplers); ``set`` checks every key and shape before it
  writes anything, so a sampler never holds a half-applied adapter;
- :func:`save_adapter` writes the current diffusers format (peft key names in
  ``pytorch_lora_weights.safetensors``, rank and alpha in its metadata, loadable with
  ``pipe.load_lora_weights``) and the kohya format (``lora_unet_...`` keys with an
  ``.alpha`` per module, for A1111 / ComfyUI), plus ``adapter_config.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from generators.config import LoraConfig
from runfiles import atomic_path, staged_folder

ADAPTER_NAME = "default"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def attach_lora(unet: torch.nn.Module, spec: LoraConfig, adapter_name: str = ADAPTER_NAME) -> None:
    """Add a LoRA adapter to the UNet modules ``spec.target_modules``; freeze everything else."""
    if adapter_name in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet already has an adapter named {adapter_name!r}")
    unet.requires_grad_(False)
    unet.add_adapter(
        PeftLoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules),
            init_lora_weights="gaussian" if spec.init == "gaussian" else True,
        ),
        adapter_name=adapter_name,
    )
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def get_adapter_state(
    unet: torch.nn.Module, adapter_name: str = ADAPTER_NAME
) -> dict[str, torch.Tensor]:
    """The adapter's weights only (peft keys), detached float32 copies on the cpu."""
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    if not state:
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}")
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


@torch.no_grad()
def set_adapter_state(
    unet: torch.nn.Module, state: Mapping[str, torch.Tensor], adapter_name: str = ADAPTER_NAME
) -> None:
    """Replace the adapter's weights in one call: all keys and shapes are checked first.

    Raises:
        ValueError: a missing, unexpected or mis-shaped key (nothing is written then).
    """
    current = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"adapter state does not match the UNet's adapter: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(
                f"adapter key {k}: shape {tuple(v.shape)} != {tuple(current[k].shape)}"
            )
        if not torch.isfinite(v).all():
            raise ValueError(f"adapter key {k}: non-finite values")
    result = set_peft_model_state_dict(unet, dict(state), adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"peft did not accept adapter keys {result.unexpected_keys[:3]}")


def _spec_of(unet: torch.nn.Module, adapter_name: str) -> dict:
    return spec_from_peft_config(unet.peft_config[adapter_name])


def spec_from_peft_config(cfg: PeftLoraConfig) -> dict:
    """rank, alpha, dropout, target modules of a peft LoRA config (adapter_config.json)."""
    return {
        "rank": int(cfg.r),
        "alpha": float(cfg.lora_alpha),
        "dropout": float(cfg.lora_dropout),
        "target_modules": sorted(cfg.target_modules),
    }


def _kohya_from_peft(
    peft_state: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    prefixed = {f"unet.{k}": v for k, v in peft_state.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    # diffusers writes alpha = rank (scale 1); keep the adapter's real alpha instead
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(float(alpha))
    return {k: v.contiguous() for k, v in kohya.items()}


def save_adapter(
    unet: torch.nn.Module,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("diffusers", "kohya"),
    adapter_name: str = ADAPTER_NAME,
    extra: Mapping | None = None,
) -> list[Path]:
    """Write the adapter in the requested formats into ``out_dir`` (atomically, as a dir).

    Returns:
        The written weight files.
    """
    return save_adapter_state(
        get_adapter_state(unet, adapter_name),
        unet.peft_config[adapter_name],
        out_dir,
        formats,
        extra,
    )


def save_adapter_state(
    peft_state: Mapping[str, torch.Tensor],
    peft_config: PeftLoraConfig,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("diffusers", "kohya"),
    extra: Mapping | None = None,
) -> list[Path]:
    """Write LoRA weights (peft keys) with their peft config as an adapter directory.

    The directory is written beside ``out_dir`` and committed in its place
    (runfiles.staged_folder): an existing ``out_dir`` is deleted only once the new one is
    in place.
    """
    bad = sorted(set(formats) - {"diffusers", "kohya"})
    if bad:
        raise ValueError(f"unknown LoRA export format(s) {bad}; allowed: diffusers, kohya")
    out_dir = Path(out_dir)
    spec = spec_from_peft_config(peft_config)
    written = []
    with staged_folder(out_dir) as tmp:
        if "diffusers" in formats:
            metadata = dict(peft_config.to_dict())
            metadata["target_modules"] = sorted(metadata.get("target_modules") or [])
            StableDiffusionPipeline.save_lora_weights(
                tmp,
                # peft key names (``lora_A`` / ``lora_B``), the format diffusers writes
                # today: its older ``lora.down`` names exist for attention projections
                # only, and diffusers' loader decides the format from the first key, so a
                # conversion would leave a mixed file whose convolution (or attention)
                # weights get lost on load
                unet_lora_layers=dict(peft_state),
                unet_lora_adapter_metadata=metadata,
                safe_serialization=True,
            )
            written.append(out_dir / DIFFUSERS_WEIGHTS)
        if "kohya" in formats:
            save_file(
                _kohya_from_peft(peft_state, spec["alpha"]),
                str(tmp / KOHYA_WEIGHTS),
                metadata={
                    "ss_network_dim": str(spec["rank"]),
                    "ss_network_alpha": str(spec["alpha"]),
                },
            )
            written.append(out_dir / KOHYA_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps({**spec, **(extra or {})}, indent=2))
    return written


@torch.no_grad()
def merge_lora(unet: torch.nn.Module) -> None:
    """Fold every LoRA adapter of ``unet`` into its base weights and remove the adapters
    (peft's merge through diffusers' ``fuse_lora`` / ``unload_lora``): the plain UNet that
    then draws what the UNet with its adapters drew."""
    if not getattr(unet, "peft_config", None):
        raise ValueError("merge_lora: the UNet has no LoRA adapter")
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()


class FoldedAdapter:
    """The UNet's adapter folded into the base weights of its layers while drawing.

    :meth:`fold` is peft's merge (each layer then computes ``(W + s B A) x`` in one
    product instead of adding ``s B A x`` beside it); :meth:`unfold` writes back copies of
    the base weights taken when this was made, so the base stays bit-identical however many
    adapter versions pass through (peft's unmerge subtracts the product again, which leaves
    float rounding behind each time). Change the adapter's weights only while unfolded
    (:meth:`unfolded`). Memory: one copy of every adapted layer's base weight.
    """

    def __init__(self, unet: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError("FoldedAdapter: the UNet has no LoRA layer")
        if any(m.merged for m in self.layers):
            raise ValueError("FoldedAdapter: the UNet's adapter is already merged")
        self.base = [m.get_base_layer().weight.detach().clone() for m in self.layers]
        self.folded = False

    @torch.no_grad()
    def fold(self) -> None:
        if not self.folded:
            for m in self.layers:
                m.merge()
            self.folded = True

    @torch.no_grad()
    def unfold(self) -> None:
        if self.folded:
            for m, w in zip(self.layers, self.base, strict=True):
                m.unmerge()
                m.get_base_layer().weight.copy_(w)
            self.folded = False

    @contextlib.contextmanager
    def unfolded(self) -> Iterator[None]:
        """Unfolded inside, folded again on the way out (also when the body raises)."""
        self.unfold()
        try:
            yield
        finally:
            self.fold()


@torch.no_grad()
def subtract_adapter(pipe: StableDiffusionPipeline, adapter: str | os.PathLike) -> None:
    """Take a merged adapter back out of the UNet's weights (W - scale * B A): the base it
    was trained on, up to float rounding. For a generator saved with its adapter merged."""
    load_adapter_into(pipe, adapter, adapter_name="merged")
    pipe.unet.fuse_lora(lora_scale=-1.0, adapter_names=["merged"])
    pipe.unet.unload_lora()


def _mismatch(where: str, missing: Sequence[str], unexpected: Sequence[str]) -> str:
    def first(keys: Sequence[str]) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = [f"{where}: the adapter's keys do not match the model"]
    if missing:
        parts.append(f"{len(missing)} missing (first: {first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {first(unexpected)})")
    return "; ".join(parts)


def _file_unet_lora(pipe: StableDiffusionPipeline, weights: Path) -> tuple[dict, list[str]]:
    """The UNet part of a LoRA file in peft key names (as diffusers converts it on load),
    and the file's keys that are not UNet LoRA (text-encoder or unknown keys)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    state, _alphas = pipe.lora_state_dict(str(weights.parent), weight_name=weights.name)
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    other = [k for k in state if not k.startswith("unet.")]
    if unet and "lora_A" not in next(iter(unet)):
        unet = convert_unet_state_dict_to_peft(unet)
    return unet, other


def load_adapter_into(
    pipe: StableDiffusionPipeline, adapter: str | os.PathLike, adapter_name: str = ADAPTER_NAME
) -> None:
    """Load an exported adapter (dir or weights file, diffusers or kohya) into a pipeline.

    All or nothing: every tensor of the file must land on a LoRA layer of the UNet and every
    LoRA layer the adapter creates must get its tensors, with their shapes; otherwise the
    adapter is removed again and a ValueError names the first missing and unexpected keys
    (diffusers alone skips keys it cannot place with a warning, and the adapter draws
    something else without a word).
    """
    adapter = Path(adapter)
    if adapter.is_dir():
        weights = adapter / DIFFUSERS_WEIGHTS
        if not weights.is_file():
            weights = adapter / KOHYA_WEIGHTS
    else:
        weights = adapter
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter}: no {DIFFUSERS_WEIGHTS} or {KOHYA_WEIGHTS} found")
    if adapter_name in (getattr(pipe.unet, "peft_config", None) or {}):
        raise ValueError(f"{weights}: the UNet already has an adapter named {adapter_name!r}")
    import diffusers

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for BertModel": by design
    try:
        expected, other = _file_unet_lora(pipe, weights)
        if other:
            raise ValueError(_mismatch(str(weights), [], other) + " (medrl adapts the UNet only)")
        if not expected:
            raise ValueError(f"{weights}: no UNet LoRA weights in the file")
        try:
            with warnings.catch_warnings():  # peft warns of what is checked below
                warnings.simplefilter("ignore", RuntimeWarning)
                pipe.load_lora_weights(
                    str(weights.parent), weight_name=weights.name, adapter_name=adapter_name
                )
        except (RuntimeError, ValueError, KeyError) as e:
            _drop_adapter(pipe, adapter_name)
            raise ValueError(f"{weights}: the adapter does not fit the UNet: {e}") from e
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter_name)
    missing = sorted(set(loaded) - set(expected))
    unexpected = sorted(set(expected) - set(loaded))
    if not missing and not unexpected:
        wrong = [
            k for k, v in expected.items()
            if tuple(v.shape) != tuple(loaded[k].shape) or not torch.equal(v.to(loaded[k]), loaded[k])
        ]  # fmt: skip
        if not wrong:
            return
        _drop_adapter(pipe, adapter_name)
        raise ValueError(
            f"{weights}: {len(wrong)} tensors did not load as stored (first: {wrong[0]})"
        )
    _drop_adapter(pipe, adapter_name)
    raise ValueError(_mismatch(str(weights), missing, unexpected))


def _drop_adapter(pipe: StableDiffusionPipeline, adapter_name: str) -> None:
    if adapter_name in (getattr(pipe.unet, "peft_config", None) or {}):
        pipe.unet.delete_adapters(adapter_name)


def check_lora_pairs(state: Mapping[str, torch.Tensor], rank: int, where: str) -> None:
    """Every module has both LoRA factors with the adapter's rank, and nothing else is in
    the file: else a ValueError naming the first offending keys."""
    a = {k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")}
    b = {k.removesuffix(".lora_B.weight") for k in state if k.endswith(".lora_B.weight")}
    other = [k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if other or a != b:
        missing = [f"{m}.lora_B.weight" for m in a - b] + [f"{m}.lora_A.weight" for m in b - a]
        raise ValueError(_mismatch(where, missing, other))
    wrong = [
        m for m in sorted(a)
        if state[f"{m}.lora_A.weight"].shape[0] != rank
        or state[f"{m}.lora_B.weight"].shape[1] != rank
    ]  # fmt: skip
    if wrong:
        raise ValueError(
            f"{where}: LoRA factors of {wrong[0]} (and {len(wrong) - 1} more) do not have the "
            f"adapter's rank {rank}"
        )


def export_run_adapter(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    formats: Sequence[str] | None = None,
    generator: str | os.PathLike | None = None,
) -> list[Path]:
    """Re-export a saved adapter (diffusers format) into ``out`` in the requested formats.

    Used by ``medrl export``: the adapter's rank and alpha come from its metadata. The file
    is checked first (both factors of every module, the adapter's rank); with
    ``generator`` it must also load completely into that generator's UNet.
    """
    adapter = Path(adapter)
    weights = adapter / DIFFUSERS_WEIGHTS if adapter.is_dir() else adapter
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter}: no {DIFFUSERS_WEIGHTS} to export")
    try:
        state = load_file(str(weights))
    except SafetensorError as exc:
        raise ValueError(f"{weights}: not a safetensors file ({exc})") from None
    config_file = weights.parent / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} missing: cannot tell the adapter's rank and alpha")
    try:
        spec = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file}: not JSON ({exc})") from None
    formats = tuple(formats or ("diffusers", "kohya"))
    bad = sorted(set(formats) - {"diffusers", "kohya"})
    if bad:
        raise ValueError(f"unknown LoRA export format(s) {bad}; allowed: diffusers, kohya")
    # diffusers format ("unet.<module>.lora.down.weight" or "...lora_A.weight") -> peft keys
    peft_state = {}
    for k, v in state.items():
        key = k.removeprefix("unet.")
        key = key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        key = key.replace(".lora_linear_layer.down.", ".lora_A.").replace(
            ".lora_linear_layer.up.", ".lora_B."
        )
        peft_state[key] = v
    check_lora_pairs(peft_state, int(spec["rank"]), str(weights))
    if generator is not None:  # the full check: it loads into that generator's UNet
        from generators.model import load_generator

        load_adapter_into(load_generator(generator).pipe, weights)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "diffusers" in formats:
        shutil.copyfile(weights, out / DIFFUSERS_WEIGHTS)
        written.append(out / DIFFUSERS_WEIGHTS)
    if "kohya" in formats:
        with atomic_path(out / KOHYA_WEIGHTS) as tmp:
            save_file(
                _kohya_from_peft(peft_state, spec["alpha"]),
                str(tmp),
                metadata={
                    "ss_network_dim": str(spec["rank"]),
                    "ss_network_alpha": str(spec["alpha"]),
                },
            )
        written.append(out / KOHYA_WEIGHTS)
    shutil.copyfile(config_file, out / ADAPTER_CONFIG)
    return written
