"""The SIMULATED expert of the demo phantom: its rules, determinism, and the CSVs it writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from generators.phantom import PhantomRecord, sample_record
from generators.phantom_render import render
from rewards.ratings import ingest_ratings, read_ratings
from rewards.simulated import (
    SIMULATED_LEVEL,
    SimulatedExpert,
    alignment_rating,
    grade_bin,
    parse_prompt,
    read_pool,
    simulate_ratings,
    write_demo_pool,
)


def record(seed: int = 0, **kw) -> PhantomRecord:
    return sample_record(np.random.default_rng(seed), f"r{seed}", **kw)


def test_parse_prompt():
    claims = parse_prompt(record(1, laterality="left", dr_grade=2).prompt)
    assert claims == {"laterality": "left", "dr_grade": 2}
    # "non-proliferative" must not be read as "proliferative"
    assert parse_prompt("right eye, severe non-proliferative diabetic retinopathy")["dr_grade"] == 3
    assert parse_prompt("Right Eye, proliferative diabetic retinopathy")["dr_grade"] == 4
    assert parse_prompt("a fundus photograph") == {"laterality": None, "dr_grade": None}


@pytest.mark.parametrize(
    "claims, laterality, image_bin, expected",
    [
        ({"laterality": "left", "dr_grade": 2}, "left", 2, 3),  # all as said
        ({"laterality": "right", "dr_grade": 2}, "left", 2, 2),  # wrong eye
        ({"laterality": "left", "dr_grade": 1}, "left", 2, 2),  # grade one bin off
        ({"laterality": "left", "dr_grade": 0}, "left", 2, 1),  # lesions denied
        ({"laterality": "left", "dr_grade": 3}, "left", 1, 1),  # two bins off
        ({"laterality": "right", "dr_grade": 1}, "left", 2, 1),  # eye and grade
        ({"laterality": "left", "dr_grade": 4}, "left", 3, 3),  # 3 and 4 share a bin
        ({"laterality": None, "dr_grade": None}, "right", 0, 3),  # nothing claimed
    ],
)
def test_alignment_rule(claims, laterality, image_bin, expected):
    assert alignment_rating(claims, laterality, image_bin) == expected


def test_record_ratings_are_the_ground_truth():
    expert = SimulatedExpert()
    for seed in range(12):
        r = record(seed)
        quality, alignment = expert.rate(r.prompt, record=r)
        assert quality == r.quality_grade
        assert alignment == 3  # its own prompt
    r = record(0, laterality="right", dr_grade=0)
    wrong = r.evolve(laterality="left").prompt
    assert expert.rate(wrong, record=r) == (r.quality_grade, 2)
    assert grade_bin(4) == 3


def test_pixel_ratings_follow_the_image():
    """Without the record, measure() on the pixels gives mostly the same ratings."""
    expert = SimulatedExpert()
    agree_q = agree_a = 0
    records = [record(s) for s in range(20)]
    for r in records:
        image = render(r, 64)
        q_px, a_px = expert.rate(r.prompt, image=image)
        q, a = expert.rate(r.prompt, record=r)
        agree_q += q_px == q
        agree_a += a_px == a
    assert agree_q >= 14 and agree_a >= 14  # 70%: measure() is an estimate
    with pytest.raises(ValueError, match="give the record or the image"):
        expert.rate("left eye")


def test_rater_noise_is_deterministic_and_about_the_rate():
    noisy = SimulatedExpert("simulated-expert-2", seed=5, noise=0.3)
    records = [record(s) for s in range(200)]
    first = [noisy.rate(r.prompt, record=r, key=r.id) for r in records]
    again = [noisy.rate(r.prompt, record=r, key=r.id) for r in reversed(records)][::-1]
    assert first == again  # order of images does not matter
    changed = np.mean([q != r.quality_grade for (q, _), r in zip(first, records, strict=True)])
    assert 0.2 < changed < 0.4
    assert all(q in (1, 2, 3) and a in (1, 2, 3) for q, a in first)
    with pytest.raises(ValueError, match="must start with 'simulated'"):
        SimulatedExpert("dr-smith")


def test_demo_pool_and_its_ratings_ingest(tmp_path, rating_pool):
    pool, csv = rating_pool
    items = read_pool(pool)
    assert len({i.path for i in items}) == 24 and all(i.record is not None for i in items)
    frame = pd.read_csv(csv)
    assert set(frame["expert_level"]) == {SIMULATED_LEVEL}
    assert set(frame["rater_id"]) == {"simulated-expert-1", "simulated-expert-2"}
    assert sorted(frame["rating"].value_counts().index) == [1, 2, 3]
    assert set(frame["prompt_faithfulness"]) <= {0.0, 5.0, 10.0}
    lines = [json.loads(line) for line in (pool / "pool.jsonl").read_text().splitlines()]
    assert {d["mismatch"] for d in lines} >= {"none"} and len(lines) > 24  # some mismatched
    grades = [d["record"]["quality_grade"] for d in lines if d["mismatch"] == "none"]
    assert sorted(set(grades)) == [1, 2, 3]
    report = ingest_ratings(csv, tmp_path / "db.sqlite")
    assert report.inserted == len(frame)
    assert ingest_ratings(csv, tmp_path / "db.sqlite").inserted == 0
    with pytest.raises(FileExistsError):
        write_demo_pool(pool, count=2, size=32)


def test_simulate_is_reproducible_and_reads_generated_samples(tmp_path, rating_pool):
    pool, csv = rating_pool
    again = simulate_ratings(pool, tmp_path / "again.csv", raters=2, noise=0.2, seed=3)
    assert again.read_text() == csv.read_text()  # same seed: identical CSV
    # a `medrl generate` folder: samples.parquet with path, prompt, seed, generator, adapter
    gen = tmp_path / "samples"
    (gen / "img").mkdir(parents=True)
    from generators.images import save_png

    rows = []
    for i in range(3):
        r = record(i)
        save_png(render(r, 64), gen / "img" / f"{i}.png")
        rows.append(
            {"path": f"img/{i}.png", "prompt": r.prompt, "seed": i, "generator": "g", "adapter": ""}
        )
    pd.DataFrame(rows).to_parquet(gen / "samples.parquet")
    out = simulate_ratings(gen)
    frame = read_ratings(out)
    assert frame["seed"].tolist() == [0, 1, 2] and set(frame["generator_ckpt"]) == {"g"}
    assert frame["prompt_faithfulness"].notna().all()
    with pytest.raises(FileNotFoundError, match="samples.parquet"):
        simulate_ratings(tmp_path / "samples" / "img")
