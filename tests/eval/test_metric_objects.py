"""eval's metric objects: chunk size does not change a number, and no metric keeps every image."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from eval.evaluate import _plan, _select, _stream
from eval.example import write_example
from eval.features import FallbackFeatures
from eval.image_metrics import (
    DIVERSITY_PER_GROUP,
    GRID_IMAGES,
    GRID_PROMPTS,
    TURNED_OFF,
    DiversityMetric,
    FundusMetric,
    PrivacyMetric,
    ReportGrids,
    UtilityMetric,
)
from eval.metrics import DistributionMetric, PromptMetric
from eval.privacy import SSIM_SIZE
from eval.samples import find_samples
from eval.utility import UTILITY_SIZE


class Batched(FallbackFeatures):
    """The fallback features, handed to the stream in chunks of ``batch_size`` images."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size=batch_size)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example(
        tmp_path_factory.mktemp("metric-objects"), generated_per_prompt=DIVERSITY_PER_GROUP + 2
    )


def _run(example, batch_size: int):
    samples = find_samples(example.run_dir)
    frame, keep, train, hold = _select(samples, Path(example.manifest), None)
    extractor = Batched(batch_size)
    plan = _plan(samples, frame, keep, train, hold, extractor, 0.95)
    diversity = DiversityMetric(plan)
    metrics = [
        DistributionMetric(plan),
        diversity,
        PromptMetric(plan, diversity),
        FundusMetric(plan),
        PrivacyMetric(plan),
    ]
    utility, grids = UtilityMetric(plan), ReportGrids(plan)
    _stream(plan, extractor, [*metrics, utility, grids])
    return plan, metrics, utility, grids, {m.key: m.compute().values for m in metrics}


def _numbers(v, path=""):
    """Every number of a nested section, by its path."""
    if isinstance(v, dict):
        return {k: x for key, sub in v.items() for k, x in _numbers(sub, f"{path}/{key}").items()}
    if isinstance(v, (list, tuple)):
        return {k: x for i, sub in enumerate(v) for k, x in _numbers(sub, f"{path}/{i}").items()}
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {path: float(v)}
    return {}


def test_chunk_size_changes_no_number(example):
    *_, one = _run(example, batch_size=64)
    *_, many = _run(example, batch_size=3)
    a, b = _numbers(one), _numbers(many)
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        assert math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12) or (
            math.isnan(a[k]) and math.isnan(b[k])
        ), k


def test_metrics_keep_only_the_images_they_use(example):
    plan, metrics, utility, grids, _ = _run(example, batch_size=5)
    # the example's images are larger than both copies, so keeping copies saves pixels
    assert plan.size > UTILITY_SIZE and plan.size >= SSIM_SIZE
    n_gen, n_train = len(plan.gen_paths), len(plan.train)
    diversity = metrics[1]
    kept = diversity._kept
    assert len(kept["generated"]) < n_gen and len(kept["train"]) <= n_train
    for p in set(plan.gen_prompts):
        mine = [i for i in kept["generated"] if plan.gen_prompts[i] == p]
        assert len(mine) == min(DIVERSITY_PER_GROUP, plan.gen_prompts.count(p))
    assert len(grids._gen) == min(GRID_PROMPTS, len(set(plan.gen_prompts))) * GRID_IMAGES
    privacy = metrics[4]
    for side, copies in privacy._small.items():
        assert all(c.shape[-2:] == (SSIM_SIZE, SSIM_SIZE) for c in copies), side
    assert utility.skipped is None
    for side, copies in utility._small.items():
        assert set(copies) == set(utility.labels[side])
        assert all(c.shape == (3, UTILITY_SIZE, UTILITY_SIZE) for c in copies.values())


def test_utility_turned_off_is_a_skipped_section_without_a_note(example):
    samples = find_samples(example.run_dir)
    frame, keep, train, hold = _select(samples, Path(example.manifest), None)
    plan = _plan(samples, frame, keep, train, hold, Batched(64), 0.95)
    off = UtilityMetric(plan, enabled=False).compute()
    assert off.values == {"skipped": TURNED_OFF} and off.notes == []
    unlabelled = UtilityMetric(replace(plan, frame=plan.frame.assign(label="")))
    skipped = unlabelled.compute()
    assert "no labels" in skipped.values["skipped"]
    assert skipped.notes == [f"utility skipped: {skipped.values['skipped']}"]
