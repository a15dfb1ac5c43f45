"""`medrl ratings ...` and `medrl rewards train` end to end on a tiny simulated pool."""

from __future__ import annotations

import json

from medrl.cli import main

TINY = [
    "rewards.vision.image_size=32",
    "rewards.vision.hidden_size=16",
    "rewards.vision.num_layers=1",
    "rewards.vision.num_heads=2",
    "rewards.vision.intermediate_size=32",
    "rewards.text_encoder.hidden_size=16",
    "rewards.text_encoder.num_layers=1",
    "rewards.text_encoder.num_heads=2",
    "rewards.text_encoder.intermediate_size=32",
    "rewards.epochs=1",
    "rewards.stage1_epochs=1",
    "rewards.stage2_epochs=1",
    "rewards.num_samples=4",
    "rewards.compare_objectives=false",
    "run.device=cpu",
]


def test_ratings_cli_round_trip(tmp_path, capsys):
    pool, db = tmp_path / "pool", tmp_path / "ratings.db"
    assert main(["ratings", "simulate", "--pool", str(pool), "--count", "12", "--size", "32"]) == 0
    assert "SIMULATED" in capsys.readouterr().out
    csv = pool / "ratings.csv"
    assert main(["ratings", "ingest", str(csv), "--db", str(db)]) == 0
    assert "stored" in capsys.readouterr().out
    # ingesting the same file again stores nothing twice
    assert main(["ratings", "ingest", str(csv), "--db", str(db)]) == 0
    assert " 0 stored" in capsys.readouterr().out
    # two noisy raters in a store of their own: agreement between them
    two, db2 = tmp_path / "two.csv", tmp_path / "two.db"
    args = ["ratings", "simulate", str(pool), "--raters", "2", "--noise", "0.2", "--out", str(two)]
    assert main(args) == 0
    assert main(["ratings", "ingest", str(two), "--db", str(db2)]) == 0
    capsys.readouterr()
    assert main(["ratings", "agreement", "--db", str(db2), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "simulated-expert-2" in json.dumps(report)
    out = tmp_path / "export.parquet"
    assert main(["ratings", "export", str(out), "--db", str(db)]) == 0
    assert out.is_file()

    rewards_out = tmp_path / "rewards"
    args = ["rewards", "train", "--ratings", str(db), "--images-root", str(pool)]
    assert main([*args, "--out", str(rewards_out), *TINY]) == 0
    report = json.loads((rewards_out / "report.json").read_text())
    assert (rewards_out / "selector").is_dir() and (rewards_out / "alignment").is_dir()
    assert report


def test_ratings_ingest_bad_rows_exit_nonzero_and_store_nothing(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text(
        "image_path,rating,modality,expert_level,prompt,rater_id,timestamp,generator_ckpt,seed\n"
        "a.png,2,fundus,senior,left eye,r1,2026-01-01T00:00:00,ck,1\n"
        "b.png,7,fundus,senior,left eye,r1,2026-01-01T00:00:00,ck,1\n"
    )
    db = tmp_path / "r.db"
    assert main(["ratings", "ingest", str(csv), "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert "bad.csv" in err and "line 3" in err and "rating" in err
    if db.exists():  # the store may be created, but holds no rating
        import sqlite3

        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from ratings").fetchone()[0] == 0


def test_rewards_config_errors_name_the_key(capsys):
    assert main(["rewards", "train", "rewards.threshold=2"]) == 2
    assert "rewards.threshold" in capsys.readouterr().err
