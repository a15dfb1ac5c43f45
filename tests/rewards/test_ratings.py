"""The ratings CSV, the SQLite store, export, and agreement between raters."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from generators.csv_rows import DataValidationError
from rewards.agreement import agreement_report, format_agreement, krippendorff_alpha
from rewards.ratings import (
    EXPORT_COLUMNS,
    SCHEMA_VERSION,
    connect,
    export_ratings,
    ingest_ratings,
    normalise_rating,
    read_ratings,
)
from rewards.ratings_csv import parse_timestamp

HEADER = "image_path,rating,modality,expert_level,prompt,rater_id,timestamp,generator_ckpt,seed\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def good_csv(tmp_path) -> Path:
    return write(
        tmp_path / "ratings.csv",
        HEADER
        + "a.png,3,fundus,ophthalmologist,left eye,dr-1,2025-03-01T10:00:00Z,ckpt-1,7\n"
        + "a.png,2,fundus,resident,left eye,dr-2,2025-03-01T10:05:00Z,ckpt-1,7\n"
        + 'b.png,1,fundus,ophthalmologist,"right eye, mild",dr-1,1740823200,,\n',
    )


def test_normalise_rating_is_cs787():
    assert [normalise_rating(r) for r in (1, 2, 3)] == [0.0, 0.5, 1.0]


def test_ingest_stores_rows_and_reingest_adds_nothing(tmp_path, good_csv):
    db = tmp_path / "ratings.db"
    report = ingest_ratings(good_csv, db)
    assert (report.rows, report.inserted, report.already_stored) == (3, 3, 0)
    assert report.raters == {"dr-1": 2, "dr-2": 1}
    again = ingest_ratings(good_csv, db)
    assert (again.inserted, again.already_stored, again.total_in_store) == (0, 3, 3)
    frame = read_ratings(db)
    assert frame["rating_norm"].tolist() == [1.0, 0.5, 0.0]
    # timestamps are stored canonically: "Z" and Unix seconds become ISO 8601 with offset
    assert frame["timestamp"].tolist()[0] == "2025-03-01T10:00:00+00:00"
    assert frame["timestamp"].tolist()[2] == "2025-03-01T10:00:00+00:00"
    assert frame["seed"].tolist()[:2] == [7, 7] and pd.isna(frame["seed"].iloc[2])


def test_store_is_wal_with_schema_version(tmp_path, good_csv):
    db = tmp_path / "ratings.db"
    ingest_ratings(good_csv, db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ValueError, match="newer"):
        connect(db)


def test_not_sqlite_is_a_clear_error(tmp_path):
    bogus = write(tmp_path / "ratings.db", "this is not a database, just text " * 20)
    with pytest.raises(ValueError, match="not a medrl ratings store"):
        connect(bogus)


def test_a_locked_store_says_so_and_readers_are_not_blocked(
    tmp_path, good_csv, monkeypatch, capsys
):
    """Another writer holding the lock: writers give up after the busy timeout with a
    message saying so (it used to read "not a medrl ratings store (database is locked)");
    readers take no write lock and read what is committed (issue 13)."""
    import time

    import rewards.ratings as ratings
    from medrl.cli import main

    db = tmp_path / "ratings.db"
    ingest_ratings(good_csv, db)
    monkeypatch.setattr(ratings, "BUSY_TIMEOUT_S", 0.2)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        started = time.perf_counter()
        with pytest.raises(ratings.StoreLockedError) as err:
            ingest_ratings(good_csv, db)
        assert time.perf_counter() - started < 5
        assert str(err.value) == (
            f"{db}: the ratings store is locked by another writer (waited 0.2 s); "
            "try again, or close the other process that is writing to it"
        )
        with pytest.raises(ratings.StoreLockedError):
            connect(db)
        assert len(read_ratings(db)) == 3
        assert export_ratings(db, tmp_path / "out.csv").is_file()
        assert main(["ratings", "ingest", str(good_csv), "--db", str(db)]) == 2
        assert "locked by another writer" in capsys.readouterr().err
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ingest_ratings(good_csv, db).already_stored == 3


def test_an_overlong_field_names_the_file_and_line(tmp_path):
    """A 200,000-character field is a bad row naming the file and line, not a raw
    _csv.Error (issue 13)."""
    csv_path = write(
        tmp_path / "ratings.csv",
        HEADER
        + "a.png,3,fundus,ophthalmologist,left eye,dr-1,2025-03-01T10:00:00Z,ckpt-1,7\n"
        + f"b.png,3,fundus,ophthalmologist,{'y' * 200_000},dr-1,2025-03-01T10:00:00Z,,\n",
    )
    with pytest.raises(DataValidationError) as err:
        ingest_ratings(csv_path, tmp_path / "ratings.db")
    assert str(err.value).startswith(
        f"{csv_path}: 1 bad row, nothing written:\n  line 3 (row): a field is longer than "
        "131,072 characters"
    )
    with pytest.raises(DataValidationError, match="line 3"):
        read_ratings(csv_path)


def test_bad_rows_are_all_listed_and_nothing_is_stored(tmp_path, good_csv):
    db = tmp_path / "ratings.db"
    ingest_ratings(good_csv, db)
    bad = write(
        tmp_path / "bad.csv",
        HEADER
        + "c.png,3,fundus,x,p,dr-1,2025-03-02T10:00:00,,\n"  # fine (line 2)
        + "d.png,4,fundus,x,p,dr-1,2025-03-02T10:00:00,,\n"  # rating 4 (line 3)
        + ",2,plasma,x,p,,yesterday,,1.5\n"  # five problems (line 4)
        + "c.png,3,fundus,x,p,dr-1,2025-03-02T10:00:00,,\n"  # duplicate of line 2 (line 5)
        + "a.png,1,fundus,x,left eye,dr-1,2025-03-01T10:00:00Z,ckpt-1,7\n",  # stored key (6)
    )
    with pytest.raises(DataValidationError) as err:
        ingest_ratings(bad, db)
    problems = {(p.row, p.column) for p in err.value.problems}
    assert (3, "rating") in problems
    assert {
        (4, "image_path"),
        (4, "modality"),
        (4, "rater_id"),
        (4, "timestamp"),
        (4, "seed"),
    } <= problems
    assert (5, "row") in problems
    text = str(err.value)
    assert "line 5 (row): same image_path, rater_id, timestamp and round as line 2" in text
    assert (6, "row") in problems and "with different values: rating 3 (file: 1)" in text
    assert read_ratings(db)["image_path"].tolist() == ["a.png", "a.png", "b.png"]  # unchanged


def test_header_aliases_and_aspects(tmp_path):
    csv = write(
        tmp_path / "aspects.csv",
        "Path,Score,Rater,Time,Text,Clinical Realism,Prompt Faithfulness,"
        "Detectability of Abnormality,Color and Contrast,Intra-set Diversity,"
        "Confidence of Use (Clinical),notes\n"
        "x.png,2,r1,2025-01-01,a prompt,7,8.5,6,5,4,3,ignored\n",
    )
    frame = read_ratings(csv)
    row = frame.iloc[0]
    assert (row.image_path, row.rating, row.rater_id, row.prompt) == ("x.png", 2, "r1", "a prompt")
    assert [row.clinical_realism, row.prompt_faithfulness, row.abnormality_detectability] == [
        7,
        8.5,
        6,
    ]
    assert [row.colour_contrast, row.intra_set_diversity, row.confidence_of_use] == [5, 4, 3]


def test_missing_required_column_and_bad_aspect(tmp_path):
    no_rater = write(tmp_path / "a.csv", "image_path,rating,timestamp\nx.png,2,2025-01-01\n")
    with pytest.raises(DataValidationError, match="missing required column.*rater_id"):
        read_ratings(no_rater)
    aspect = write(
        tmp_path / "b.csv",
        "image_path,rating,rater_id,timestamp,realism\nx.png,2,r,2025-01-01,11\n",
    )
    with pytest.raises(DataValidationError, match="line 2 \\(clinical_realism\\)"):
        read_ratings(aspect)


def test_export_roundtrips_through_csv_and_parquet(tmp_path, good_csv):
    db = tmp_path / "ratings.db"
    ingest_ratings(good_csv, db)
    out_csv = export_ratings(db, tmp_path / "out" / "ratings.csv")
    out_pq = export_ratings(db, tmp_path / "out" / "ratings.parquet")
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic: no temporary left
    assert pd.read_csv(out_csv).columns.tolist() == list(EXPORT_COLUMNS)
    # the exported CSV ingests into a fresh store with the same content
    db2 = tmp_path / "copy.db"
    assert ingest_ratings(out_csv, db2).inserted == 3
    pd.testing.assert_frame_equal(read_ratings(db), read_ratings(db2))
    pd.testing.assert_frame_equal(read_ratings(db), read_ratings(out_pq))
    # and re-ingesting it into the original store adds nothing
    assert ingest_ratings(out_csv, db).inserted == 0
    with pytest.raises(ValueError, match=".csv or .parquet"):
        export_ratings(db, tmp_path / "out.xlsx")


def test_parse_timestamp():
    assert parse_timestamp("2025-03-01 10:00") == "2025-03-01T10:00:00"
    assert parse_timestamp("0") == "1970-01-01T00:00:00+00:00"
    with pytest.raises(ValueError, match="neither ISO 8601"):
        parse_timestamp("last tuesday")


# --------------------------------------------------------------------------- agreement


def test_krippendorff_alpha_hand_computed():
    # Units (1,1), (2,3), (3,3): coincidences o_11 = 2, o_23 = o_32 = 1, o_33 = 2, so
    # n_1 = 2, n_2 = 1, n_3 = 3, n = 6.
    # ordinal d^2: d_12 = (3 - 1.5)^2 = 2.25, d_23 = (4 - 2)^2 = 4, d_13 = (6 - 2.5)^2 = 12.25
    #   observed sum o*d = 2 * 4 = 8; expected sum n_c n_k d = 2 * (2*2.25 + 6*12.25 + 3*4) = 180
    #   alpha = 1 - (n - 1) * 8 / 180 = 1 - 40/180 = 7/9
    units = [(1, 1), (2, 3), (3, 3)]
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(7 / 9)
    # interval d^2 = (c - k)^2: observed 2, expected 2 * (2*1 + 6*4 + 3*1) = 58 -> 1 - 10/58
    assert krippendorff_alpha(units, "interval") == pytest.approx(24 / 29)
    # nominal: observed 2, expected 2 * (2 + 6 + 3) = 22 -> 1 - 10/22
    assert krippendorff_alpha(units, "nominal") == pytest.approx(6 / 11)


def test_krippendorff_alpha_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers,
    # 12 units, missing values; published alpha nominal .743, ordinal .815, interval .849
    a = [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None]
    b = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3]
    c = [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None]
    d = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]
    units = [[v for v in unit if v is not None] for unit in zip(a, b, c, d, strict=True)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_alpha_undefined_and_perfect():
    assert krippendorff_alpha([(2,), (3,)]) is None  # nothing pairable
    assert krippendorff_alpha([(2, 2), (2, 2)]) is None  # no expected disagreement
    assert krippendorff_alpha([(1, 1), (3, 3), (2, 2)]) == pytest.approx(1.0)


def test_agreement_report_two_raters(tmp_path):
    rows = [
        ("i1.png", 1, 1),
        ("i2.png", 2, 2),
        ("i3.png", 3, 2),
        ("i4.png", 3, 3),
        ("i5.png", 1, 2),
    ]
    lines = [HEADER.strip()]
    for n, (img, ra, rb) in enumerate(rows):
        lines.append(f"{img},{ra},fundus,x,p,A,2025-01-01T00:00:{n:02d},,")
        lines.append(f"{img},{rb},fundus,x,p,B,2025-01-01T00:01:{n:02d},,")
    # A re-rates i5 later: only the latest rating of a rater counts
    lines.append("i5.png,2,fundus,x,p,A,2025-01-02T00:00:00,,")
    csv = write(tmp_path / "two.csv", "\n".join(lines) + "\n")
    report = agreement_report(csv)
    assert report["units"] == 5 and report["pairable_units"] == 5
    a = [1, 2, 3, 3, 2]
    b = [1, 2, 2, 3, 2]
    expected = cohen_kappa_score(a, b, weights="quadratic", labels=[1, 2, 3])
    assert report["pairs"][0]["raters"] == ["A", "B"]
    assert report["pairs"][0]["kappa_quadratic"] == pytest.approx(expected)
    assert report["alpha_ordinal"] == pytest.approx(
        krippendorff_alpha(list(zip(a, b, strict=True)), "ordinal")
    )
    assert "quadratic weighted kappa" in format_agreement(report)
