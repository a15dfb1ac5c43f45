"""The procedural fundus phantom: records, drawing, ground truth vs pixels, measure(), dataset."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from generators import phantom, phantom_dataset
from generators.fundus_measure import measure
from generators.phantom import (
    DR_GRADE_NAMES,
    LAYER_NAMES,
    Lesion,
    PhantomRecord,
    prompt_for,
    quality_grade_for,
    sample_record,
)
from generators.phantom_dataset import CSV_COLUMNS, load_records, write_demo_dataset
from generators.phantom_render import render, render_layers


def _records(n: int, seed: int = 0, **kw) -> list[PhantomRecord]:
    rng = np.random.default_rng(seed)
    return [sample_record(rng, f"t-{i}", **kw) for i in range(n)]


def _good(record: PhantomRecord) -> PhantomRecord:
    """The same eye photographed without defects."""
    return record.evolve(blur=0.0, illumination=0.05, noise=0.004)


@pytest.fixture(scope="module")
def records() -> list[PhantomRecord]:
    return _records(400, seed=11)


# --------------------------------------------------------------------------- records


def test_record_round_trips_through_json(records):
    for record in records[:50]:
        again = PhantomRecord.from_dict(json.loads(json.dumps(record.to_dict())))
        assert again == record
    with pytest.raises(ValueError, match="unknown"):
        PhantomRecord.from_dict({**records[0].to_dict(), "colour": "red"})


def test_record_validates_its_invariants(records):
    healthy = next(r for r in records if r.dr_grade == 0)
    sick = next(r for r in records if r.dr_grade == 3)
    with pytest.raises(ValueError, match="empty exactly when"):
        healthy.evolve(dr_grade=2)
    with pytest.raises(ValueError, match="empty exactly when"):
        sick.evolve(lesions=())
    with pytest.raises(ValueError, match="quality_grade"):
        healthy.evolve(blur=0.03, quality_grade=3)
    with pytest.raises(ValueError, match="laterality"):
        healthy.evolve(laterality="both")
    with pytest.raises(ValueError, match="kind"):
        Lesion("drusen", 0.5, 0.5, 0.01)


def test_evolve_rederives_quality_and_prompt(records):
    record = _good(records[0])
    assert record.quality_grade == 3 and "good image quality" in record.prompt
    worse = record.evolve(blur=0.02)
    assert worse.quality_grade == 1 and "poor image quality" in worse.prompt


def test_quality_rule():
    assert quality_grade_for(0.0, 0.1, 0.005) == 3
    assert quality_grade_for(0.008, 0.1, 0.005) == 2  # one mild defect
    assert quality_grade_for(0.0, 0.5, 0.005) == 2
    assert quality_grade_for(0.0, 0.1, 0.03) == 2
    assert quality_grade_for(0.02, 0.1, 0.005) == 1  # one severe defect
    assert quality_grade_for(0.0, 0.8, 0.005) == 1
    assert quality_grade_for(0.0, 0.1, 0.06) == 1
    assert quality_grade_for(0.008, 0.5, 0.005) == 1  # two mild defects


def test_sampled_distributions_are_balanced(records):
    grades = np.bincount([r.dr_grade for r in records], minlength=5) / len(records)
    assert np.all(np.abs(grades - np.array(phantom.DR_GRADE_PROBS)) < 0.07), grades
    quality = np.bincount([r.quality_grade for r in records], minlength=4)[1:] / len(records)
    assert quality[2] > 0.55 and quality[0] > 0.05 and quality[1] > 0.05, quality
    right = np.mean([r.laterality == "right" for r in records])
    assert 0.4 < right < 0.6
    assert any(r.cup_to_disc > 0.6 for r in records) and any(r.cup_to_disc <= 0.3 for r in records)


def test_geometry_follows_laterality(records):
    for r in records:
        assert np.sign(r.disc_x - 0.5) == r.side
        assert np.sign(r.disc_x - r.macula_x) == r.side
        dd = math.hypot(r.disc_x - r.macula_x, r.disc_y - r.macula_y) / (2 * r.disc_radius)
        assert 2.2 < dd < 2.8  # fovea about 2.5 disc diameters temporal to the disc
        assert r.disc_y < r.macula_y  # the disc sits a little above the fovea


def test_lesions_follow_the_grade_rules(records):
    for r in records:
        kinds = {les.kind for les in r.lesions}
        assert (len(r.lesions) == 0) == (r.dr_grade == 0)
        for les in r.lesions:
            assert math.hypot(les.x - r.disc_x, les.y - r.disc_y) > r.disc_radius + les.radius
            assert math.hypot(les.x - 0.5, les.y - 0.5) < phantom.FOV_RADIUS
        if r.dr_grade == 1:
            assert kinds == {"microaneurysm"}
        if r.dr_grade == 2:
            assert kinds == {"microaneurysm", "haemorrhage", "exudate"}
        if r.dr_grade >= 3:
            assert {"microaneurysm", "haemorrhage", "exudate", "cotton_wool"} <= kinds
            haem = [les for les in r.lesions if les.kind == "haemorrhage" and not les.preretinal]
            quadrants = {(les.x > 0.5, les.y > 0.5) for les in haem}
            assert len(quadrants) == 4, "severe NPDR: haemorrhages in all four quadrants"
        if r.dr_grade < 4:
            assert not any(les.preretinal for les in r.lesions)

    # hard exudates cluster near the macula, closer than the scattered haemorrhages
    def mean_dist(kind):
        return np.mean([
            math.hypot(les.x - r.macula_x, les.y - r.macula_y)
            for r in records for les in r.lesions if les.kind == kind and not les.preretinal
        ])  # fmt: skip

    assert mean_dist("exudate") < 0.7 * mean_dist("haemorrhage")


def test_prompt_names_grade_laterality_lesions_cdr_and_quality(records):
    for r in records[:100]:
        p = prompt_for(r)
        assert p == r.prompt
        assert p.startswith(f"colour fundus photograph, {r.laterality} eye, ")
        assert DR_GRADE_NAMES[r.dr_grade] in p
        assert f"cup-to-disc ratio {r.cup_to_disc:.1f}" in p
        assert ("glaucoma suspect" in p) == (r.cup_to_disc > 0.6)
        assert f"{phantom.QUALITY_NAMES[r.quality_grade]} image quality" in p
        kinds = {les.kind for les in r.lesions if not les.preretinal}
        for kind, words in [
            ("microaneurysm", "microaneurysms"),
            ("haemorrhage", "haemorrhages"),
            ("exudate", "hard exudates"),
            ("cotton_wool", "cotton wool spots"),
        ]:
            assert (words in p) == (kind in kinds), (kind, p)
        assert ("neovascularization" in p) == (r.dr_grade == 4)
        assert ("preretinal" in p) == any(les.preretinal for les in r.lesions)
    grade2 = next(r for r in records if r.dr_grade == 2 and r.quality_grade == 3)
    assert (
        "moderate non-proliferative diabetic retinopathy with microaneurysms, haemorrhages "
        "and hard exudates" in grade2.prompt
    )


# --------------------------------------------------------------------------- drawing


def test_render_is_deterministic_and_resolution_independent(records):
    r = records[3]
    a, b = render(r, 64), render(r, 64)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert a.tobytes() == b.tobytes()
    big = render(r, 128)
    assert big.shape == (128, 128, 3)
    # the 128 px drawing, averaged down, is the 64 px drawing
    down = big.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(down - a.astype(float)).mean() < 6
    assert a[0, 0].max() == 0 and a[-1, -1].max() == 0  # black outside the field of view


def test_same_seed_same_images():
    one = [render(r, 48).tobytes() for r in _records(4, seed=5)]
    two = [render(r, 48).tobytes() for r in _records(4, seed=5)]
    other = [render(r, 48).tobytes() for r in _records(4, seed=6)]
    assert one == two and one != other


def test_layers_have_the_documented_keys_and_disc_side(records):
    for r in records[:20]:
        layers = render_layers(r, 64)
        assert tuple(layers) == LAYER_NAMES
        assert all(m.dtype == bool and m.shape == (64, 64) for m in layers.values())
        disc_x = (np.nonzero(layers["disc"])[1].mean() + 0.5) / 64
        assert (disc_x > 0.5) == (r.laterality == "right")
        assert abs(disc_x - r.disc_x) < 0.02
        assert layers["cup"].sum() <= layers["disc"].sum()
        assert not (layers["disc"] & ~layers["fov"]).any()
        for kind in phantom.LESION_KINDS:
            assert layers[kind].any() == any(les.kind == kind for les in r.lesions), kind
            assert not (layers[kind] & layers["disc"]).any()


def test_ground_truth_matches_the_pixels(records):
    sick = [_good(r) for r in records if r.dr_grade >= 3][:4]
    assert len(sick) == 4
    for r in sick:
        img = render(r, 128).astype(float) / 255
        layers = render_layers(r, 128)
        lesion = np.zeros((128, 128), bool)
        for kind in phantom.LESION_KINDS:
            lesion |= layers[kind]
        retina = layers["fov"] & ~layers["disc"] & ~layers["vessels"] & ~lesion
        bg = np.median(img[retina], axis=0)
        ex = img[layers["exudate"]].mean(axis=0)  # bright yellow
        assert ex[0] > 0.8 and ex[1] > bg[1] + 0.25 and ex[2] < 0.75 * ex[1], (ex, bg)
        red = img[layers["haemorrhage"] | layers["microaneurysm"]].mean(axis=0)  # dark red
        assert red[0] > 2 * red[1] and red[1] < 0.6 * bg[1] and red[0] < bg[0], (red, bg)
        cws = img[layers["cotton_wool"]].mean(axis=0)  # pale, whiter than exudates
        assert cws[1] > bg[1] + 0.2 and cws[2] / cws[1] > ex[2] / ex[1]
        disc = img[layers["disc"] & ~layers["vessels"]].mean(axis=0)  # bright yellowish
        assert disc[1] > 1.4 * bg[1] and disc[0] >= bg[0]
        vessel = img[layers["vessels"] & ~layers["disc"] & ~lesion].mean(axis=0)
        assert vessel[1] < 0.85 * bg[1] and vessel[0] > 2 * vessel[1]  # darker, red
    healthy = next(r for r in records if r.dr_grade == 0)
    layers = render_layers(healthy, 64)
    assert not any(layers[k].any() for k in phantom.LESION_KINDS)


# --------------------------------------------------------------------------- measure


def test_measure_lesion_fractions_follow_the_grade(records):
    healthy = [_good(r) for r in records if r.dr_grade == 0][:6]
    severe = [_good(r) for r in records if r.dr_grade >= 3][:6]
    for r in healthy:
        m = measure(render(r, 64))
        assert m["red_lesion_fraction"] < 0.002 and m["exudate_fraction"] < 0.002, m
    for r in severe:
        m = measure(render(r, 64))
        assert m["red_lesion_fraction"] > 0.004 and m["exudate_fraction"] > 0.002, m
    big = measure(render(severe[0], 256))
    assert big["red_lesion_fraction"] > 0.004 and big["cotton_wool_fraction"] > 0.0005, big


def test_measure_laterality_agrees_with_the_record():
    recs = _records(40, seed=21)
    small = [measure(render(r, 64))["laterality"] == r.laterality for r in recs]
    assert np.mean(small) >= 0.95
    for r in recs:
        m = measure(render(r, 256))
        assert m["laterality"] == r.laterality, r.id
        assert abs(m["disc_x"] - r.disc_x) < 0.05 and abs(m["disc_y"] - r.disc_y) < 0.05


def test_measure_sees_the_quality_defects(records):
    for r in [_good(r) for r in records[:4]]:
        good = measure(render(r, 64))
        blurred = measure(render(r.evolve(blur=0.016), 64))
        noisy = measure(render(r.evolve(noise=0.06), 64))
        dark = measure(render(r.evolve(illumination=0.85), 64))
        assert blurred["sharpness"] < 0.5 * good["sharpness"]
        assert noisy["noise"] > good["noise"] + 0.03
        assert dark["illumination_uniformity"] < good["illumination_uniformity"] - 0.2
    # over the sampled data: poor images are blurrier or noisier than good ones
    poor = [r for r in records if r.quality_grade == 1 and r.illumination < 0.35][:6]
    good = [r for r in records if r.quality_grade == 3][:6]
    assert len(poor) >= 4 and len(good) == 6
    mp = [measure(render(r, 64)) for r in poor]
    mg = [measure(render(r, 64)) for r in good]
    sharp_g = np.median([m["sharpness"] for m in mg])
    noise_g = np.median([m["noise"] for m in mg])
    for m in mp:
        assert m["sharpness"] < 0.5 * sharp_g or m["noise"] > 2 * noise_g, m


def test_measure_works_on_other_images():
    import skimage.data

    real = skimage.data.retina()  # a real photograph of a left eye
    m = measure(real)
    assert m["laterality"] == "left" and m["disc_x"] < 0.3
    assert m["red_lesion_fraction"] < 0.002 and m["exudate_fraction"] < 0.002
    assert measure(np.ascontiguousarray(real[:, ::-1]))["laterality"] == "right"
    small = np.asarray(Image.fromarray(real).resize((96, 96)))
    assert measure(small)["laterality"] == "left"
    wide = np.zeros((64, 100, 3), np.uint8)
    wide[:, 18:82] = render(_records(1, seed=3)[0], 64)
    assert measure(wide)["laterality"] == _records(1, seed=3)[0].laterality
    assert measure(wide.astype(np.float32) / 255)["laterality"] == measure(wide)["laterality"]
    with pytest.raises(ValueError, match="field of view"):
        measure(np.zeros((32, 32, 3), np.uint8))


# --------------------------------------------------------------------------- dataset


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_write_demo_dataset(tmp_path):
    out = tmp_path / "demo"
    csv_path = write_demo_dataset(out, count=10, size=32, seed=4, val_fraction=0.2)
    assert csv_path == out / "data.csv"
    header, rows = _read_csv(csv_path)
    assert tuple(header) == CSV_COLUMNS
    records = load_records(out)
    lines = [json.loads(line) for line in (out / "phantom.jsonl").read_text().splitlines()]
    assert len(rows) == len(records) == len(lines) == 10
    for row, record, line in zip(rows, records, lines, strict=True):
        assert row["path"] == line["path"] == f"images/{record.id}.png"
        assert row["Text"] == record.prompt
        assert int(row["label"]) == record.dr_grade
        assert row["laterality"] == record.laterality
        assert (row["modality"], row["source_dataset"]) == ("fundus", "phantom")
        image = np.asarray(Image.open(out / row["path"]))
        assert image.shape == (32, 32, 3)
        assert image.tobytes() == render(record, 32).tobytes()
    # left/right eyes of one patient share the id and the split
    by_patient: dict[str, list[dict]] = {}
    for row in rows:
        by_patient.setdefault(row["patient_id"], []).append(row)
    assert all(sorted(r["laterality"] for r in v) == ["left", "right"] for v in by_patient.values())
    assert all(len({r["split"] for r in v}) == 1 for v in by_patient.values())
    assert {r["split"] for r in rows} == {"train", "val"}
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"]  # no temporary left

    # same parameters: kept as is; other parameters or a foreign directory: refused
    before = (out / "data.csv").stat().st_mtime_ns
    assert write_demo_dataset(out, count=10, size=32, seed=4, val_fraction=0.2) == csv_path
    assert (out / "data.csv").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="demo"):
        write_demo_dataset(out, count=10, size=32, seed=5, val_fraction=0.2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="foreign"):
        write_demo_dataset(foreign, count=2, size=32)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    # an existing empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    write_demo_dataset(empty, count=2, size=32, seed=4, val_fraction=0.2)
    assert (empty / "phantom.jsonl").is_file()


def test_write_demo_dataset_is_deterministic(tmp_path):
    a = write_demo_dataset(tmp_path / "a", count=4, size=32, seed=9)
    b = write_demo_dataset(tmp_path / "b", count=4, size=32, seed=9)
    assert a.read_bytes() == b.read_bytes()
    for name in ("phantom-00000.png", "phantom-00003.png"):
        assert (a.parent / "images" / name).read_bytes() == (
            b.parent / "images" / name
        ).read_bytes()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_render = phantom_dataset.render

    def failing_render(record, size):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_render(record, size)

    monkeypatch.setattr(phantom_dataset, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(tmp_path / "demo", count=6, size=32)
    assert list(tmp_path.iterdir()) == []


def test_grid_command(tmp_path, capsys):
    out = tmp_path / "figs" / "grid.png"
    from medrl.cli import main

    args = ["data", "phantom-grid", str(out), "--size", "32", "--count", "5", "--bits", "6"]
    assert main(args) == 0
    grid = np.asarray(Image.open(out))
    assert grid.ndim == 3 and grid.shape[1] > 3 * 32
    assert "wrote" in capsys.readouterr().out
