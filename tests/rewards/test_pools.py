"""Rating pools of the generator's own samples (checkpoints, guidance scales, VAE
reconstructions, real anchors), rated by the SIMULATED expert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from generators.images import load_image
from rewards.pools import list_checkpoints, load_checkpoint_generator, write_generated_pool
from rewards.ratings import ingest_ratings, read_ratings
from rewards.simulated import SimulatedExpert, read_pool
from tests.rewards.test_rounds import build_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("pool-run"), checkpoints=3)


@pytest.fixture(scope="module")
def pool(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gp") / "pool"
    write_generated_pool(
        tiny_run,
        tiny_run.parent / "data" / "manifest.parquet",
        out,
        guidance_scales=(1.0, 4.0),
        prompts=3,
        seeds_per_prompt=2,
        reconstructions=4,
        real=6,
        mismatch_fraction=0.5,
        num_steps=2,
        seed=1,
    )
    return out


def _lines(pool: Path) -> list[dict]:
    return [json.loads(x) for x in (pool / "pool.jsonl").read_text().splitlines() if x.strip()]


def test_checkpoints_load_as_they_were(tiny_run):
    ckpts = list_checkpoints(tiny_run)
    assert [c.name for c in ckpts] == ["step-000001", "step-000002", "step-000003"]
    final = load_checkpoint_generator(tiny_run, None)
    first = load_checkpoint_generator(tiny_run, ckpts[0])
    name = next(iter(first.unet.state_dict()))
    assert not torch.equal(first.unet.state_dict()[name], final.unet.state_dict()[name])
    from safetensors.torch import load_file

    assert torch.equal(
        first.unet.state_dict()[name], load_file(str(ckpts[0] / "unet.safetensors"))[name]
    )
    # the VAE is the run's (the checkpoints do not carry one)
    v = next(iter(final.vae.state_dict()))
    assert torch.equal(first.vae.state_dict()[v], final.vae.state_dict()[v])


def test_generated_pool_has_three_sources_and_pixel_ratings(pool):
    lines = _lines(pool)
    images = {d["path"]: d for d in lines}
    sources = {d["source"] for d in images.values()}
    assert sources == {"real", "reconstruction", "generated"}
    gen = [d for d in images.values() if d["source"] == "generated"]
    # default checkpoints: all but the newest (the final generator is that one)
    assert {d["checkpoint"] for d in gen} == {"step-000001", "step-000002", "final"}
    assert {d["guidance_scale"] for d in gen} == {1.0, 4.0}
    assert len(gen) == 3 * 2 * 3 * 2  # checkpoints x guidance x prompts x seeds
    assert sum(d["source"] == "reconstruction" for d in images.values()) == 4
    assert sum(d["source"] == "real" for d in images.values()) == 6
    # records only for the real anchors; a mismatched-prompt share for every source
    assert all(("record" in d) == (d["source"] == "real") for d in lines)
    for source in ("generated", "real"):
        kinds = {d["mismatch"] for d in lines if d["source"] == source}
        assert "none" in kinds and len(kinds) > 1, source
    info = json.loads((pool / "pool.json").read_text())
    assert info["images"] == {"real": 6, "reconstruction": 4, "generated": 36}

    # the ratings: from the pixels for generated and reconstructed images, from the
    # record for real ones; one rating per shown (image, prompt)
    frame = read_ratings(pool / "ratings.csv")
    assert len(frame) == len(lines)
    expert = SimulatedExpert()
    items = {(i.path, i.prompt): i for i in read_pool(pool)}
    for row in frame.itertuples():
        d = images[row.image_path]
        item = items[(row.image_path, row.prompt)]
        if d["source"] == "real":
            quality, alignment = expert.rate(row.prompt, record=item.record)
        else:
            assert item.record is None
            image = load_image(pool / row.image_path)
            quality, alignment = expert.rate(row.prompt, image=image)
        assert row.rating == quality
        assert row.prompt_faithfulness == {1: 0.0, 2: 5.0, 3: 10.0}[alignment]
    gen_rows = frame[frame.image_path.str.startswith("images/gen-")]
    assert gen_rows["seed"].notna().all()
    assert gen_rows["generator_ckpt"].str.contains("step-000001").any()


def test_generated_pool_trains_rewards_unchanged(pool, tmp_path, tiny_rewards):
    from rewards.training import train_rewards

    db = tmp_path / "ratings.db"
    ingest_ratings(pool / "ratings.csv", db)
    assert read_ratings(db)["image_path"].nunique() == 46
    report = train_rewards(db, pool, tmp_path / "rewards", tiny_rewards, device="cpu")
    assert report["images"] == 46 and report["pairs"] == len(_lines(pool))
    assert (tmp_path / "rewards" / "selector").is_dir()


def test_generated_pool_beside_the_phantom_pool_in_one_store(pool, rating_pool, tmp_path):
    """Two pools, one store, one images root: --images-from rewrites the second's paths."""
    from rewards.rating_data import load_images, resolve_image

    phantom_dir, phantom_csv = rating_pool
    db = tmp_path / "both.db"
    ingest_ratings(phantom_csv, db)
    report = ingest_ratings(pool / "ratings.csv", db, images_root=phantom_dir, images_from=pool)
    assert report.inserted == len(_lines(pool))
    frame = read_ratings(db)
    ours = frame[frame["generator_ckpt"] != "phantom"]
    assert ours["image_path"].map(lambda p: Path(p).is_absolute()).all()  # outside the root
    assert all(resolve_image(phantom_dir, p).is_file() for p in frame["image_path"])
    assert load_images(phantom_dir, frame["image_path"].tolist()[:3], 32).shape[0] == 3
    # the same file again adds nothing (the rewrite is the same)
    again = ingest_ratings(pool / "ratings.csv", db, images_root=phantom_dir, images_from=pool)
    assert again.inserted == 0


def test_generated_pool_refuses_unknown_checkpoints_and_full_dirs(tiny_run, tmp_path):
    manifest = tiny_run.parent / "data" / "manifest.parquet"
    with pytest.raises(FileNotFoundError, match="step-000009"):
        write_generated_pool(tiny_run, manifest, tmp_path / "p", checkpoints=["step-000009"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError):
        write_generated_pool(tiny_run, manifest, tmp_path / "full")
    assert not any(p.name.startswith(".p") for p in tmp_path.iterdir())
