"""Label converters: public fundus label files -> data CSV rows through the prompt templates."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generators.converters import CONVERTERS, PROMPT_TEMPLATES, convert_labels
from generators.csv_rows import DataValidationError
from generators.datasets import COLUMNS, ingest_csv
from medrl.cli import main

# One small label file per dataset, in the column layout it is distributed with, and the
# rows we expect from it: (path, Text, label, laterality, patient_id).
CASES = {
    "eyepacs": (
        "trainLabels.csv",
        "image,level\n10_left,0\n10_right,2\n",
        {"image_dir": "train"},
        [
            ("train/10_left.jpeg", "colour fundus photograph, left eye, no diabetic retinopathy",
             "0", "left", "10"),
            ("train/10_right.jpeg", "colour fundus photograph, right eye, moderate "
             "non-proliferative diabetic retinopathy", "2", "right", "10"),
        ],
    ),
    "aptos": (
        "train.csv",
        "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n",
        {"image_dir": "train_images"},
        [
            ("train_images/000c1434d8d7.png", "colour fundus photograph, moderate "
             "non-proliferative diabetic retinopathy", "2", "unknown", ""),
            ("train_images/001639a390f0.png", "colour fundus photograph, proliferative "
             "diabetic retinopathy", "4", "unknown", ""),
        ],
    ),
    "idrid": (
        "IDRiD_Disease Grading_Training Labels.csv",
        # the real header ends in a space and rows carry empty trailing columns
        "Image name,Retinopathy grade,Risk of macular edema ,,\nIDRiD_001,3,2,,\n"
        "IDRiD_002,0,0,,\n,,,,\n",
        {},
        [
            ("IDRiD_001.jpg", "colour fundus photograph, severe non-proliferative diabetic "
             "retinopathy, diabetic macular edema risk 2", "3", "unknown", ""),
            ("IDRiD_002.jpg", "colour fundus photograph, no diabetic retinopathy, diabetic "
             "macular edema risk 0", "0", "unknown", ""),
        ],
    ),
    "odir": (
        "odir.csv",
        "ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,"
        "Right-Diagnostic Keywords,N,D,G,C,A,H,M,O\n"
        "0,69,Female,0_left.jpg,0_right.jpg,cataract,normal fundus,0,0,0,1,0,0,0,0\n"
        "1,57,Male,1_left.jpg,1_right.jpg,normal fundus,"
        "moderate non proliferative retinopathy\uff0chypertensive retinopathy,1,1,0,0,0,1,0,0\n"
        "2,,Male,2_left.jpg,2_right.jpg,anterior segment image,glaucoma,0,0,1,0,0,0,0,1\n",
        {"image_dir": "images"},
        [
            ("images/0_left.jpg", "colour fundus photograph, left eye, cataract, "
             "69-year-old female", "cataract", "left", "0"),
            ("images/0_right.jpg", "colour fundus photograph, right eye, normal fundus, "
             "69-year-old female", "normal fundus", "right", "0"),
            ("images/1_left.jpg", "colour fundus photograph, left eye, normal fundus, "
             "57-year-old male", "normal fundus", "left", "1"),
            ("images/1_right.jpg", "colour fundus photograph, right eye, moderate non "
             "proliferative retinopathy, hypertensive retinopathy, 57-year-old male",
             "moderate non proliferative retinopathy, hypertensive retinopathy", "right", "1"),
            ("images/2_right.jpg", "colour fundus photograph, right eye, glaucoma, male",
             "glaucoma", "right", "2"),
        ],
    ),
    "messidor2": (
        "messidor_data.csv",
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "20051020_43808_0100_PP.png,0,0,1\nIM002385.JPG,2,1,1\n20051020_43832_0100_PP.png,,,0\n",
        {"image_dir": "IMAGES"},
        [
            ("IMAGES/20051020_43808_0100_PP.png", "colour fundus photograph, no diabetic "
             "retinopathy, no diabetic macular edema", "0", "unknown", ""),
            ("IMAGES/IM002385.JPG", "colour fundus photograph, moderate non-proliferative "
             "diabetic retinopathy, diabetic macular edema", "2", "unknown", ""),
        ],
    ),
    "airogs": (
        "train_labels.csv",
        "challenge_id,class\nTRAIN000000,NRG\nTRAIN000001,RG\n",
        {},
        [
            ("TRAIN000000.jpg", "colour fundus photograph, no referable glaucoma", "NRG",
             "unknown", ""),
            ("TRAIN000001.jpg", "colour fundus photograph, referable glaucoma", "RG", "unknown",
             ""),
        ],
    ),
}  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def test_registry_matches_cases_and_templates():
    assert set(CONVERTERS) == set(CASES) == set(PROMPT_TEMPLATES)


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_converter_rows(dataset, tmp_path):
    name, text, kwargs, expected = CASES[dataset]
    labels = tmp_path / name
    labels.write_text(text, encoding="utf-8")
    out = convert_labels(dataset, labels, split="val", **kwargs)
    assert out == tmp_path / "data.csv"
    rows = read_rows(out)
    got = [(r["path"], r["Text"], r["label"], r["laterality"], r["patient_id"]) for r in rows]
    assert got == expected
    assert {r["modality"] for r in rows} == {"fundus"}
    assert {r["split"] for r in rows} == {"val"}
    assert {r["source_dataset"] for r in rows} == {dataset}


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_wrong_format_names_missing_columns(dataset, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("foo,bar\n1,2\n")
    with pytest.raises(DataValidationError) as info:
        convert_labels(dataset, labels)
    message = str(info.value)
    assert "line 1 (header): missing column(s)" in message
    for column in CONVERTERS[dataset].columns:
        assert repr(column) in message
    assert "this file has foo,bar" in message
    assert not (tmp_path / "data.csv").exists()


BAD_VALUES = {
    "eyepacs": ("image,level\n1_left,0\n1_right,7\n2_left,\n3,1\n", [
        (3, "level", "'7' is not valid; must be 0 to 4"),
        (4, "level", "grade is empty"),
        (5, "image", "does not end in _left or _right"),
    ]),
    "aptos": ("id_code,diagnosis\nabc,5\n,1\n", [
        (2, "diagnosis", "'5' is not valid"),
        (3, "id_code", "image id is empty"),
    ]),
    "idrid": ("Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,2,3\nIDRiD_002,x,1\n", [
        (2, "Risk of macular edema", "'3' is not valid; must be 0 to 2"),
        (3, "Retinopathy grade", "'x' is not valid"),
    ]),
    "odir": (
        "ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,"
        "Right-Diagnostic Keywords\n0,old,Female,0_left.jpg,0_right.jpg,cataract,\n", [
            (2, "Patient Age", "'old' is not valid"),
            (2, "Right-Diagnostic Keywords", "right eye keywords are empty"),
        ]),
    "messidor2": (
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "a.png,1.5,0,1\nb.png,1,2,1\nc.png,1,0,yes\n", [
            (2, "adjudicated_dr_grade", "'1.5' is not valid"),
            (3, "adjudicated_dme", "'2' is not valid; must be 0 to 1"),
            (4, "adjudicated_gradable", "'yes' is not valid"),
        ]),
    "airogs": ("challenge_id,class\nTRAIN0,RG\nTRAIN1,maybe\nTRAIN0,NRG\n", [
        (3, "class", "must be RG or NRG"),
        (4, "image", "duplicate image 'TRAIN0.jpg', first on line 2"),
    ]),
}  # fmt: skip


@pytest.mark.parametrize("dataset", sorted(BAD_VALUES))
def test_bad_values_are_reported_with_their_lines(dataset, tmp_path):
    text, expected = BAD_VALUES[dataset]
    labels = tmp_path / "labels.csv"
    labels.write_text(text, encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        convert_labels(dataset, labels)
    problems = info.value.problems
    assert [(p.row, p.column) for p in problems] == [(line, col) for line, col, _ in expected]
    for problem, (_, _, fragment) in zip(problems, expected, strict=True):
        assert fragment in problem.reason
    assert "nothing written" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_messidor2_counts_skipped_ungradable_rows(tmp_path, caplog):
    name, text, kwargs, _ = CASES["messidor2"]
    labels = tmp_path / name
    labels.write_text(text)
    with caplog.at_level(logging.INFO, logger="generators.converters"):
        convert_labels("messidor2", labels)
    assert "skipped 1: ungradable image" in caplog.text


def test_ext_override_and_excel_file(tmp_path):
    labels = tmp_path / "trainLabels.csv"
    labels.write_text("image,level\n10_left,1\n")
    out = convert_labels("eyepacs", labels, out=tmp_path / "o" / "e.csv", ext="png")
    assert read_rows(out)[0]["path"] == "10_left.png"

    xlsx = tmp_path / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"
    xlsx.write_bytes(b"PK\x03\x04 not really a workbook")
    with pytest.raises(ValueError, match="export the sheet to CSV"):
        convert_labels("odir", xlsx)
    with pytest.raises(ValueError, match="unknown dataset 'kaggle'"):
        convert_labels("kaggle", labels)


def test_cli_convert_then_ingest(tmp_path, capsys):
    labels = tmp_path / "trainLabels.csv"
    labels.write_text("image,level\n10_left,0\n10_right,3\n")
    for i, name in enumerate(["10_left", "10_right"]):
        (tmp_path / "train").mkdir(exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "train" / f"{name}.jpeg", format="JPEG")
    assert main(["data", "convert", "eyepacs", str(labels), "--image-dir", "train"]) == 0
    assert "data.csv" in capsys.readouterr().out
    report = ingest_csv(tmp_path / "data.csv")
    assert report.rows == 2 and report.modalities == {"fundus": 2}
