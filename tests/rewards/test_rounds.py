"""Rating rounds: blind sheets of the generator's samples, ingestion with the round key,
rounds and raters kept apart, the store's migration to rounds."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from pathlib import Path

import pytest
import torch

from generators.csv_rows import DataValidationError
from rewards.ratings import SCHEMA_VERSION, connect, ingest_ratings, read_ratings
from rewards.rounds import KEY_FILE, SHEET_FILE, export_round, next_round_name, round_prompts
from rewards.simulated import simulate_ratings

PROMPTS = [
    "colour fundus photograph, left eye, no diabetic retinopathy",
    "colour fundus photograph, right eye, moderate non-proliferative diabetic retinopathy",
]


def build_tiny_run(root: Path, checkpoints: int = 2) -> Path:
    """``root/run``: a random 32 px demo generator (``generator/``), ``checkpoints``
    full-UNet fine-tuning checkpoints (perturbed UNets), an RL adapter (``rl/adapter``),
    and ``root/data``: 24 phantoms with their manifest."""
    from safetensors.torch import save_file

    from generators.config import LoraConfig
    from generators.datasets import ingest_csv
    from generators.lora import attach_lora, save_adapter
    from generators.model import build_generator
    from generators.phantom_dataset import write_demo_dataset
    from medrl.config import load_config

    cfg = load_config(None, ["model.resolution=32"])
    run = root / "run"
    gen = build_generator(cfg.model, seed=0)
    gen.save(run / "generator")
    g = torch.Generator().manual_seed(1)
    for k in range(1, checkpoints + 1):
        ckpt = run / "checkpoints" / f"step-{k:06d}"
        ckpt.mkdir(parents=True)
        state = {
            n: (v + 0.01 * k * torch.randn(v.shape, generator=g)).contiguous()
            for n, v in gen.unet.state_dict().items()
        }
        save_file(state, str(ckpt / "unet.safetensors"))
        te = {n: v.contiguous() for n, v in gen.text_encoder.state_dict().items()}
        save_file(te, str(ckpt / "text_encoder.safetensors"))
    attach_lora(gen.unet, LoraConfig(rank=2, alpha=2.0))
    with torch.no_grad():
        for n, p in gen.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=g)
    save_adapter(gen.unet, run / "rl" / "adapter", formats=("diffusers",))
    csv_path = write_demo_dataset(root / "data", count=24, size=32, seed=5)
    ingest_csv(csv_path, root=root / "data", out=root / "data" / "manifest.parquet")
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("round-run"))


def _export(run: Path, out: Path, name: str, adapters=(None,), per_prompt: int = 2) -> Path:
    return export_round(
        run / "generator",
        PROMPTS,
        out,
        round_name=name,
        adapters=adapters,
        per_prompt=per_prompt,
        num_steps=2,
        guidance_scale=3.0,
        device="cpu",
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_export_round_writes_a_blind_sheet(tiny_run, tmp_path):
    adapter = str(tiny_run / "rl" / "adapter")
    out = tmp_path / "rounds" / "round-1"
    sheet = _export(tiny_run, out, "round-1", adapters=[None, adapter])
    assert sheet == out / SHEET_FILE
    assert sorted(p.name for p in out.iterdir()) == [KEY_FILE, "images", SHEET_FILE]
    assert [p.name for p in tmp_path.joinpath("rounds").iterdir()] == ["round-1"]  # no temp
    rows = _rows(sheet)
    assert len(rows) == len(PROMPTS) * 2 * 2
    # what the raters see: random names, no generator / adapter / seed anywhere
    names = sorted(p.name for p in (out / "images").iterdir())
    assert all(re.fullmatch(r"[0-9a-f]{16}\.png", n) for n in names)
    assert sorted(Path(r["image_path"]).name for r in rows) == names
    for row in rows:
        for column, cell in row.items():
            for secret in ("adapter", "generator", "rl/", "step-", str(tiny_run)):
                assert secret not in cell, (column, cell)
        assert row["round"] == "round-1" and row["prompt"] in PROMPTS
        for column in ("rating", "rater_id", "timestamp", "generator_ckpt", "seed"):
            assert row[column] == ""
    # the key maps every image to its variant and seed; both variants drew the same seeds
    key = json.loads((out / KEY_FILE).read_text())
    assert key["round"] == "round-1"
    assert set(key["images"]) == {r["image_path"] for r in rows}
    by_variant: dict[str, set] = {}
    for entry in key["images"].values():
        by_variant.setdefault(entry["adapter"], set()).add((entry["prompt"], entry["seed"]))
    assert set(by_variant) == {"", adapter}
    assert by_variant[""] == by_variant[adapter] and len(by_variant[""]) == 4
    with pytest.raises(FileExistsError):  # a round is never overwritten
        _export(tiny_run, out, "round-1")


def test_simulated_sheet_ingests_with_its_round(tiny_run, tmp_path):
    rounds = tmp_path / "ratings" / "rounds"
    out = rounds / "round-1"
    _export(tiny_run, out, "round-1", adapters=[str(tiny_run / "rl" / "adapter")])
    filled = simulate_ratings(out, use_records=False)
    assert filled.parent == out
    db = tmp_path / "ratings" / "ratings.db"
    report = ingest_ratings(filled, db)
    assert report.inserted == 4 and report.rounds == {"round-1": 4}
    frame = read_ratings(db)
    assert (frame["round"] == "round-1").all()
    assert (frame["expert_level"] == "simulated").all()
    assert frame["generator_ckpt"].str.endswith("rl/adapter").all()
    key = json.loads((out / KEY_FILE).read_text())
    seeds = {e["seed"] for e in key["images"].values()}
    assert set(frame["seed"].astype(int)) == seeds
    # paths relative to the store's folder, where training looks by default
    assert frame["image_path"].str.startswith("rounds/round-1/images/").all()
    assert all((db.parent / p).is_file() for p in frame["image_path"])
    assert ingest_ratings(filled, db).inserted == 0  # re-ingesting adds nothing


def test_two_rounds_keep_rows_apart_by_round_and_rater(tiny_run, tmp_path):
    rounds = tmp_path / "rounds"
    db = tmp_path / "ratings.db"
    assert next_round_name(rounds) == "round-1"
    for _ in range(2):
        name = next_round_name(rounds)
        _export(tiny_run, rounds / name, name, per_prompt=1)
        ingest_ratings(simulate_ratings(rounds / name, raters=2, noise=0.3), db)
    assert next_round_name(rounds) == "round-3"
    frame = read_ratings(db)
    counts = frame.groupby(["round", "rater_id"]).size().to_dict()
    assert counts == {
        (r, f"simulated-expert-{k}"): 2 for r in ("round-1", "round-2") for k in (1, 2)
    }

    # the same image rated in two rounds: two rows; the same rater, image, time and
    # round again with another rating: an error naming the stored line
    header = "image_path,rating,rater_id,timestamp,round\n"
    two = tmp_path / "two.csv"
    two.write_text(header + "x.png,1,dr-a,2025-01-01,r1\nx.png,3,dr-a,2025-01-01,r2\n")
    assert ingest_ratings(two, db).inserted == 2
    again = tmp_path / "again.csv"
    again.write_text(header + "x.png,2,dr-a,2025-01-01,r1\n")
    with pytest.raises(DataValidationError, match="already stored from two.csv line 2"):
        ingest_ratings(again, db)
    twice = tmp_path / "twice.csv"
    twice.write_text(header + "y.png,2,dr-a,2025-01-01,r1\ny.png,2,dr-a,2025-01-01,r1\n")
    with pytest.raises(DataValidationError, match="timestamp and round as line 2"):
        ingest_ratings(twice, db)


def test_sheet_filled_by_hand_unrated_rows_and_key_checks(tiny_run, tmp_path):
    out = tmp_path / "rounds" / "r7"
    sheet = _export(tiny_run, out, "r7")
    rows = _rows(sheet)
    rows[0].update(rating="3", rater_id="dr-a", timestamp="2025-06-01T10:00:00Z")
    rows[1].update(rating="1", rater_id="dr-a", timestamp="2025-06-01T10:01:00Z")
    filled = out / "dr-a.csv"
    with open(filled, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    db = tmp_path / "store.db"
    report = ingest_ratings(filled, db, images_root=tmp_path)
    assert (report.inserted, report.unrated) == (2, 2)
    assert "2 sheet rows not rated" in report.summary()
    frame = read_ratings(db)
    assert frame["image_path"].str.startswith("rounds/r7/images/").all()
    assert (frame["round"] == "r7").all() and frame["seed"].notna().all()

    # an image not of the round, a changed prompt, a wrong round: all named, nothing stored
    rows[2].update(rating="2", rater_id="dr-b", timestamp="2025-06-02", image_path="x.png")
    rows[3].update(rating="2", rater_id="dr-b", timestamp="2025-06-02", prompt="other")
    rows[0].update(rater_id="dr-b", round="r8")
    with open(filled, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataValidationError) as err:
        ingest_ratings(filled, db)
    found = {(p.row, p.column) for p in err.value.problems}
    assert {(4, "image_path"), (5, "prompt"), (2, "round")} <= found
    assert len(read_ratings(db)) == 2
    # a sheet nobody filled is an error, not a silent no-op
    with pytest.raises(DataValidationError, match="no row of this sheet has been rated"):
        ingest_ratings(sheet, db)

    # a filled sheet kept elsewhere, saved on Windows: round_dir names its round
    rows = _rows(sheet)
    rows[3].update(rating="2", rater_id="dr-c", timestamp="2025-06-03T09:00:00Z")
    rows[3]["image_path"] = rows[3]["image_path"].replace("/", "\\")
    elsewhere = tmp_path / "incoming" / "dr-c.csv"
    elsewhere.parent.mkdir()
    with open(elsewhere, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(FileNotFoundError, match="not a rating round folder"):
        ingest_ratings(elsewhere, db, round_dir=tmp_path)
    report = ingest_ratings(elsewhere, db, images_root=tmp_path, round_dir=out)
    assert (report.inserted, report.unrated, report.rounds) == (1, 3, {"r7": 1})
    stored = read_ratings(db).iloc[-1]
    assert stored["image_path"] == "rounds/r7/" + rows[3]["image_path"].replace("\\", "/")


V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL);
CREATE TABLE ratings (
    id INTEGER PRIMARY KEY, image_path TEXT NOT NULL, rating INTEGER NOT NULL,
    modality TEXT NOT NULL DEFAULT '', expert_level TEXT NOT NULL DEFAULT '',
    prompt TEXT NOT NULL DEFAULT '', rater_id TEXT NOT NULL, timestamp TEXT NOT NULL,
    generator_ckpt TEXT NOT NULL DEFAULT '', seed INTEGER, clinical_realism REAL,
    prompt_faithfulness REAL, abnormality_detectability REAL, colour_contrast REAL,
    intra_set_diversity REAL, confidence_of_use REAL, source TEXT NOT NULL DEFAULT '',
    source_line INTEGER, ingested_at TEXT NOT NULL,
    UNIQUE (image_path, rater_id, timestamp)
);
CREATE INDEX ratings_by_image ON ratings (image_path, prompt);
INSERT INTO schema_version VALUES (1, '2025-01-01T00:00:00+00:00');
INSERT INTO ratings (image_path, rating, rater_id, timestamp, prompt_faithfulness, source,
    source_line, ingested_at)
VALUES ('a.png', 3, 'dr-a', '2025-01-01T00:00:00+00:00', 10, 'old.csv', 2, '2025-01-02');
"""


def test_version_1_store_is_migrated_to_rounds(tmp_path):
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(V1_SCHEMA)
    conn = connect(db)
    try:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 2
        assert SCHEMA_VERSION == 2
        row = conn.execute("SELECT * FROM ratings").fetchone()
        assert (row["image_path"], row["round"], row["source"]) == ("a.png", "", "old.csv")
        assert row["prompt_faithfulness"] == 10
    finally:
        conn.close()
    # the old rating stays; the same image, rater and time in a round is another rating
    csv_path = tmp_path / "new.csv"
    csv_path.write_text(
        "image_path,rating,rater_id,timestamp,round,prompt_faithfulness\n"
        "a.png,3,dr-a,2025-01-01T00:00:00+00:00,,10\n"
        "a.png,1,dr-a,2025-01-01T00:00:00+00:00,round-1,\n"
    )
    report = ingest_ratings(csv_path, db)
    assert (report.inserted, report.already_stored) == (1, 1)
    frame = read_ratings(db)
    assert frame["round"].tolist() == ["", "round-1"]
    assert frame["rating"].tolist() == [3, 1]
    connect(db).close()  # opening again migrates nothing
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 2


def test_round_prompts_held_out_first(tiny_run):
    manifest = tiny_run.parent / "data" / "manifest.parquet"
    from generators.datasets import read_manifest

    table = read_manifest(manifest)
    held = set(table.loc[table.split != "train", "Text"])
    n = len(held)
    chosen = round_prompts(manifest, n + 2, seed=1)
    assert set(chosen[:n]) == held and len(set(chosen)) == n + 2
    assert round_prompts(manifest, n + 2, seed=1) == chosen
    assert set(round_prompts(manifest, 50, split="heldout")) == held


def test_cli_export_round_simulate_ingest(tiny_run, tmp_path, capsys):
    from medrl.cli import main

    db = tmp_path / "store" / "ratings.db"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["ratings", "export-round", str(tiny_run), "sampling.num_steps=2", "run.device=cpu"]
    assert main([*args, "--prompts-file", str(prompts), "--per-prompt", "1", "--db", str(db)]) == 0
    out = db.parent / "rounds" / "round-1"
    assert (out / SHEET_FILE).is_file() and "round 'round-1': 2 images" in capsys.readouterr().out
    assert main(["ratings", "simulate", str(out), "--from-pixels"]) == 0
    assert main(["ratings", "ingest", str(out / "ratings.csv"), "--db", str(db)]) == 0
    frame = read_ratings(db)
    assert len(frame) == 2 and (frame["round"] == "round-1").all()
    # the run's RL adapter is the default variant
    assert frame["generator_ckpt"].str.endswith("+" + str(tiny_run / "rl" / "adapter")).all()
