"""The sampler's speed options (issue 14): ``sampling.merge_lora`` folds the adapter into
the base weights per version, ``sampling.compile`` compiles the UNet, falling back to eager.

Tolerance: the learner recomputes each recorded log-prob with the adapter beside the layers
(unfolded, eager); DDPO's first update must see ratio exp(new - old) = 1 to within ~1e-5
(the kit's clip range is 1e-4), so recorded log-probs must agree to 1e-5. Measured on the
anchor model: 5e-7 (merged), 1e-6 (compiled).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from tests.rl.conftest import PROMPTS, rl_config

REQUESTS = [("a", PROMPTS[0], 3), ("b", PROMPTS[1], 4)]


def _sampler(generator_dir, cfg, **sampling):
    from rl.samplers import Sampler

    torch.set_num_threads(1)
    return Sampler(str(generator_dir), cfg.lora, replace(cfg.sampling, **sampling), device="cpu")


def _adapter(sampler, seed: int) -> dict[str, torch.Tensor]:
    """A trained-looking adapter: every A and B moved (B starts at zero)."""
    from generators.lora import get_adapter_state

    g = torch.Generator().manual_seed(seed)
    state = get_adapter_state(sampler.gen.unet)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def _draw(sampler, version, state):
    from rl.samplers import SampleRequest

    return sampler.sample([SampleRequest(*r) for r in REQUESTS], version, [state])


@torch.no_grad()
def _replay(sampler, traj) -> torch.Tensor:
    """log p of every recorded transition, recomputed as the learner does (the adapter
    beside the layers, eager): (B, T)."""
    from generators.sampling import ddim_step_with_logprob, guided_noise_pred

    gen, s = sampler.gen, sampler.sampling
    cond, uncond = gen.encode_prompts(traj.prompts), gen.encode_prompts([""] * len(traj))
    out = []
    for j, t in enumerate(traj.timesteps):
        x = traj.latents[:, j]
        model_in = gen.scheduler.scale_model_input(x, t)
        pred = guided_noise_pred(gen, model_in, t, cond, uncond, s.guidance_scale)
        nxt = traj.latents[:, j + 1]
        out.append(ddim_step_with_logprob(gen.scheduler, pred, t, x, s.eta, prev_sample=nxt)[1])
    return torch.stack(out, dim=1)


def test_merged_adapter_draws_what_the_unmerged_one_does(rl_generator_dir, tmp_path):
    """Over two adapter versions the merged sampler records the log-probs that the adapter
    beside the layers gives its transitions (to 1e-5), its base weights come back
    bit-identical, and a refused adapter leaves the previous version folded in."""
    cfg = rl_config(tmp_path)
    plain = _sampler(rl_generator_dir, cfg, merge_lora=False)
    merged = _sampler(rl_generator_dir, cfg, merge_lora=True)
    assert plain.folded is None and merged.folded.folded
    for version, seed in enumerate([1, 2]):
        state = _adapter(plain, seed)
        ref, out = _draw(plain, version, state), _draw(merged, version, state)
        assert not torch.equal(ref.log_probs, out.log_probs)  # the merge really ran
        torch.testing.assert_close(_replay(plain, ref), ref.log_probs, rtol=0, atol=0)
        torch.testing.assert_close(_replay(plain, out), out.log_probs, rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match="missing"):
        merged.set_adapter(2, dict(list(state.items())[1:]))
    assert merged.folded.folded and merged.version == 1
    torch.testing.assert_close(_draw(merged, 1, state).log_probs, out.log_probs, rtol=0, atol=0)

    merged.folded.unfold()
    ref_weights = plain.gen.unet.state_dict()
    for k, v in merged.gen.unet.state_dict().items():
        assert torch.equal(v, ref_weights[k]), k


def _failing_backend(gm, example_inputs):
    raise RuntimeError("injected compile failure")


def test_a_failed_compile_draws_eagerly_after_one_warning(
    rl_generator_dir, tmp_path, monkeypatch, caplog
):
    """The compile fails on the first draw (an injected backend error): one warning, then
    every draw is eager and equals an uncompiled sampler's."""
    import generators.compiling

    monkeypatch.setattr(generators.compiling, "BACKEND", _failing_backend)
    cfg = rl_config(tmp_path)
    eager = _sampler(rl_generator_dir, cfg)
    compiled = _sampler(rl_generator_dir, cfg, compile=True)
    assert compiled.compiled and not eager.compiled
    state = _adapter(eager, 1)
    with caplog.at_level(logging.WARNING, logger="rl.samplers"):
        outs = [_draw(compiled, v, state) for v in (0, 0, 1)]
    warnings = [r for r in caplog.records if "sampling.compile" in r.getMessage()]
    assert len(warnings) == 1 and "injected compile failure" in warnings[0].getMessage()
    assert not compiled.compiled and compiled.info()["compiled"] is False
    ref = _draw(eager, 0, state)
    for out in outs:
        assert torch.equal(out.log_probs, ref.log_probs) and torch.equal(out.images, ref.images)


def test_no_cxx_compiler_means_eager(monkeypatch, caplog):
    import generators.compiling as compiling

    monkeypatch.setattr(compiling, "CXX", ("no-such-c++-compiler",))
    module = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="generators.compiling"):
        assert compiling.compile_in_place(module) is False
    assert "no C++ compiler" in caplog.text and module._compiled_call_impl is None


@pytest.mark.slow
def test_the_compiled_sampler_records_the_eager_log_probs(rl_generator_dir, tmp_path):
    """inductor (the real compile): log-probs within 1e-5 of the eager sampler's."""
    cfg = rl_config(tmp_path)
    eager = _sampler(rl_generator_dir, cfg)
    compiled = _sampler(rl_generator_dir, cfg, compile=True)
    state = _adapter(eager, 1)
    ref, out = _draw(eager, 0, state), _draw(compiled, 0, state)
    assert compiled.compiled
    torch.testing.assert_close(out.log_probs, ref.log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.images, ref.images, rtol=0, atol=1e-4)
