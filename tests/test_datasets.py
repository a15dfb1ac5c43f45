"""Data CSV ingestion, the Parquet manifest and ManifestDataset."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from generators.config import MODALITIES
from generators.csv_rows import DataValidationError
from generators.datasets import ManifestDataset, ingest_csv, read_manifest
from medrl.cli import main

MANIFEST_COLUMNS = [
    "row",
    "path",
    "Text",
    "modality",
    "split",
    "source_dataset",
    "label",
    "laterality",
    "patient_id",
    "width",
    "height",
    "sha256",
]


def make_image(path: Path, size: tuple[int, int] = (32, 24), seed: int = 0, fmt=None) -> Path:
    """A small random RGB image of (width, height) ``size``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- ingest: good


def test_good_csv_ingests_with_hashes_sizes_and_metadata(tmp_path):
    root = tmp_path / "ds"
    make_image(root / "a.png", (32, 24), seed=1)
    make_image(root / "imgs" / "b.jpg", (40, 40), seed=2)
    make_image(root / "imgs" / "c.tif", (20, 30), seed=3)
    csv = write_csv(
        root / "data.csv",
        """
path,Text,modality,split,source_dataset,label,laterality,patient_id
a.png,fundus photo of the left eye,Fundus,train,demo,2,LEFT,p1
./imgs/b.jpg, a chest x-ray ,xray,val,demo,,,
imgs/c.tif,colour fundus photograph,fundus,,demo,0,right,p2
""",
    )
    report = ingest_csv(csv)

    assert report.manifest == root / "manifest.parquet"
    assert report.rows == 3
    assert report.modalities == {"fundus": 2, "xray": 1}
    assert report.splits == {"train": 2, "val": 1}
    assert report.duplicates == []
    assert sorted(p.name for p in root.iterdir()) == [
        "a.png",
        "data.csv",
        "imgs",
        "manifest.parquet",
    ]

    table = pq.read_table(report.manifest)
    assert table.column_names == MANIFEST_COLUMNS
    meta = json.loads(table.schema.metadata[b"medrl"])
    assert meta["root"] == str(root.resolve())
    assert meta["csv"] == str(csv)
    assert meta["version"] == 1

    frame = table.to_pandas()
    assert frame["row"].tolist() == [2, 3, 4]
    assert frame["path"].tolist() == ["a.png", "imgs/b.jpg", "imgs/c.tif"]
    assert frame["Text"].tolist()[1] == "a chest x-ray"
    assert frame["modality"].tolist() == ["fundus", "xray", "fundus"]
    assert frame["split"].tolist() == ["train", "val", "train"]
    assert frame["laterality"].tolist() == ["left", "unknown", "right"]
    assert frame["label"].tolist() == ["2", "", "0"]
    assert frame["patient_id"].tolist() == ["p1", "", "p2"]
    assert list(zip(frame["width"], frame["height"], strict=True)) == [(32, 24), (40, 40), (20, 30)]
    for rel, digest in zip(frame["path"], frame["sha256"], strict=True):
        assert digest == hashlib.sha256((root / rel).read_bytes()).hexdigest()

    manifest = read_manifest(report.manifest)
    assert manifest["path"].tolist() == [str(root.resolve() / p) for p in frame["path"]]
    assert manifest["relpath"].tolist() == frame["path"].tolist()
    assert manifest.attrs["medrl"]["root"] == str(root.resolve())


def test_minim_and_cs787_aliases(tmp_path):
    make_image(tmp_path / "x.png", seed=4)
    make_image(tmp_path / "y.png", seed=5)
    csv = write_csv(
        tmp_path / "minim.csv",
        """
image_path,prompt,modal,Extra
x.png,an OCT scan,OCT,ignored
y.png,a colonoscopy frame,colonoscopy,ignored
""",
    )
    out = tmp_path / "out" / "m.parquet"
    report = ingest_csv(csv, out=out)
    assert report.manifest == out and out.is_file()
    frame = read_manifest(out)
    assert frame["Text"].tolist() == ["an OCT scan", "a colonoscopy frame"]
    assert frame["modality"].tolist() == ["oct", "colonoscopy"]
    assert frame["split"].tolist() == ["train", "train"]


def test_two_columns_for_one_field_is_an_error_naming_both(tmp_path):
    make_image(tmp_path / "x.png")
    csv = write_csv(tmp_path / "data.csv", "path,Text,caption,modality\nx.png,a,b,fundus\n")
    with pytest.raises(DataValidationError) as info:
        ingest_csv(csv)
    message = info.value.render()
    assert "line 1 (header)" in message
    assert "'Text'" in message and "'caption'" in message
    assert not (tmp_path / "manifest.parquet").exists()


def test_missing_required_column(tmp_path):
    csv = write_csv(tmp_path / "data.csv", "path,modality\nx.png,fundus\n")
    with pytest.raises(DataValidationError, match="missing required column"):
        ingest_csv(csv)


# --------------------------------------------------------------------------- ingest: bad rows


def test_every_bad_row_is_reported_and_nothing_is_written(tmp_path):
    root = tmp_path / "ds"
    outside = make_image(tmp_path / "outside" / "secret.png", seed=9)
    make_image(root / "a.png", seed=1)
    make_image(root / "b.png", seed=2)
    make_image(root / "c.png", seed=3)
    make_image(root / "d.png", seed=4)
    make_image(root / "tiny.png", (8, 8), seed=5)
    (root / "link.png").symlink_to(outside)
    (root / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    csv = write_csv(
        root / "data.csv",
        f"""
path,Text,modality,split
a.png,good row,fundus,train
x/../../etc/passwd,escape by dots,fundus,train
link.png,escape by symlink,fundus,train
missing.png,no such file,fundus,train
noise.png,random bytes,fundus,train
b.png,   ,fundus,train
c.png,unknown modality,ctscan,train
d.png,bad split,fundus,dev
a.png,same path again,fundus,train
tiny.png,too small,fundus,train
{outside},absolute,fundus,train
""",
    )
    before_root, before_tmp = listing(root), listing(tmp_path)
    with pytest.raises(DataValidationError) as info:
        ingest_csv(csv)
    assert listing(root) == before_root
    assert listing(tmp_path) == before_tmp

    err = info.value
    found = {(p.row, p.column): p.reason for p in err.problems}
    assert sorted(found) == [
        (3, "path"),
        (4, "path"),
        (5, "path"),
        (6, "path"),
        (7, "Text"),
        (8, "modality"),
        (9, "split"),
        (10, "path"),
        (11, "path"),
        (12, "path"),
    ]
    assert "escapes the dataset root" in found[3, "path"]
    assert "outside the dataset root" in found[4, "path"] and "secret.png" in found[4, "path"]
    assert "no such file" in found[5, "path"]
    assert "not a decodable image" in found[6, "path"]
    assert found[7, "Text"] == "Text is empty"
    assert "'ctscan'" in found[8, "modality"] and ", ".join(MODALITIES) in found[8, "modality"]
    assert "'dev'" in found[9, "split"] and "train, val, test" in found[9, "split"]
    assert "duplicate row" in found[10, "path"] and "line 2" in found[10, "path"]
    assert "8x8 px" in found[11, "path"]
    assert "absolute" in found[12, "path"]

    text = err.render()
    assert text.startswith(f"{csv}: 10 bad rows, nothing written:")
    assert "  line 3 (path): 'x/../../etc/passwd' escapes the dataset root" in text
    assert len(text.splitlines()) == 11
    assert str(err) == text
    assert pickle.loads(pickle.dumps(err)).render() == text  # crosses Ray process boundaries


def test_symlink_loop_is_a_row_problem(tmp_path):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    csv = write_csv(tmp_path / "data.csv", "path,Text,modality\nloop.png,x,fundus\n")
    with pytest.raises(DataValidationError) as info:
        ingest_csv(csv)
    assert [(p.row, p.column) for p in info.value.problems] == [(2, "path")]


def test_line_numbers_count_multiline_fields_and_blank_lines(tmp_path):
    make_image(tmp_path / "a.png")
    csv = write_csv(
        tmp_path / "data.csv",
        'path,Text,modality\na.png,"two\nlines",fundus\n\nmissing.png,x,fundus\n',
    )
    with pytest.raises(DataValidationError) as info:
        ingest_csv(csv)
    assert [(p.row, p.column) for p in info.value.problems] == [(5, "path")]


def test_identical_images_across_splits_are_an_error_within_a_split_a_warning(tmp_path):
    make_image(tmp_path / "a.png", seed=1)
    shutil.copy(tmp_path / "a.png", tmp_path / "copy.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "copy2.png")
    csv = write_csv(
        tmp_path / "data.csv",
        "path,Text,modality,split\na.png,x,fundus,train\ncopy.png,y,fundus,test\n",
    )
    with pytest.raises(DataValidationError) as info:
        ingest_csv(csv)
    (problem,) = info.value.problems
    assert problem.row == 3 and "leaks evaluation data" in problem.reason
    assert "line 2" in problem.reason

    csv.write_text("path,Text,modality,split\na.png,x,fundus,train\ncopy2.png,y,fundus,train\n")
    report = ingest_csv(csv)
    assert report.duplicates == [["a.png", "copy2.png"]]
    assert report.manifest.is_file()


# --------------------------------------------------------------------------- DICOM


def _dicom_dir() -> Path | None:
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    return folder if (folder / "693_UNCR.dcm").is_file() else None


@pytest.mark.skipif(_dicom_dir() is None, reason="pydicom-data is not installed")
def test_real_dicom_files_ingest(tmp_path):
    data = _dicom_dir()
    shutil.copy(data / "693_UNCR.dcm", tmp_path / "ct.dcm")  # CT, 512 x 512
    shutil.copy(data / "emri_small.dcm", tmp_path / "mr.dcm")  # MR, 10 frames of 64 x 64
    csv = write_csv(
        tmp_path / "data.csv",
        "path,Text,modality\nct.dcm,axial CT slice,ct\nmr.dcm,MR slice of the head,mri\n",
    )
    report = ingest_csv(csv)
    assert report.modalities == {"ct": 1, "mri": 1}
    frame = read_manifest(report.manifest)
    assert list(zip(frame["width"], frame["height"], strict=True)) == [(512, 512), (64, 64)]
    item = ManifestDataset(frame, resolution=32)[0]
    assert item["pixel_values"].shape == (3, 32, 32)


# --------------------------------------------------------------------------- CLI


def test_cli_ingest_reports_bad_rows_on_stderr(tmp_path, capsys):
    make_image(tmp_path / "a.png")
    csv = write_csv(
        tmp_path / "data.csv",
        "path,Text,modality\na.png,ok,fundus\n../a.png,escape,fundus\nmissing.png,x,fundus\n",
    )
    assert main(["data", "ingest", str(csv)]) == 1
    err = capsys.readouterr().err
    assert "2 bad rows, nothing written" in err
    assert "line 3 (path): '../a.png' escapes the dataset root" in err
    assert "line 4 (path): 'missing.png': no such file" in err
    assert not (tmp_path / "manifest.parquet").exists()

    csv.write_text("path,Text,modality\na.png,ok,fundus\n")
    assert main(["data", "ingest", str(csv)]) == 0
    assert "1 rows valid" in capsys.readouterr().out


def test_an_overlong_field_names_the_file_and_line(tmp_path, capsys):
    """A 200,000-character field (or a quote never closed, which makes the rest of the
    file one field) is a bad row naming its line, not a raw _csv.Error (issue 13)."""
    make_image(tmp_path / "a.png")
    csv = write_csv(
        tmp_path / "data.csv",
        f"path,Text,modality\na.png,ok,fundus\na.png,{'x' * 200_000},fundus\n",
    )
    assert main(["data", "ingest", str(csv)]) == 1
    err = capsys.readouterr().err
    assert f"{csv}: 1 bad row, nothing written:" in err
    assert "line 3 (row): a field is longer than 131,072 characters; a quote opened" in err
    assert not (tmp_path / "manifest.parquet").exists()

    runaway = 'path,Text,modality\na.png,ok,fundus\n\na.png,"never closed,fundus\n'
    write_csv(csv, runaway + "b.png,caption,fundus\n" * 10_000)
    with pytest.raises(DataValidationError) as info:
        ingest_csv(csv)
    assert [(p.row, p.column) for p in info.value.problems] == [(4, "row")]


# --------------------------------------------------------------------------- read_manifest


def test_read_manifest_rejects_files_that_are_not_manifests(tmp_path):
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"path": ["a.png"]}).to_parquet(plain)
    with pytest.raises(ValueError, match="not a medrl manifest"):
        read_manifest(plain)
    text = tmp_path / "notes.parquet"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a Parquet manifest"):
        read_manifest(text)
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "absent.parquet")


# --------------------------------------------------------------------------- ManifestDataset


@pytest.fixture
def manifest(tmp_path) -> Path:
    # Square images, left half red and right half blue, so a flip would show.
    for i in range(3):
        pixels = np.zeros((40, 60, 3), dtype=np.uint8)
        pixels[:, :30, 0] = 255
        pixels[:, 30:, 2] = 255
        pixels[0, 0, 1] = i  # distinct bytes
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    csv = write_csv(
        tmp_path / "data.csv",
        "path,Text,modality,split\n"
        "0.png,zero,fundus,train\n1.png,one,fundus,train\n2.png,two,oct,val\n",
    )
    return ingest_csv(csv).manifest


def test_manifest_dataset_items(manifest):
    ds = ManifestDataset(manifest, resolution=16)
    assert len(ds) == 2
    assert ds.texts == ["zero", "one"]
    item = ds[1]
    assert set(item) == {"pixel_values", "text", "index"}
    x = item["pixel_values"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert item["text"] == "one" and item["index"] == 1
    # centre crop of 60x40 keeps columns 10..50: red on the left, blue on the right, no flip
    assert x[0, :, :6].mean() > 0.9 and x[2, :, :6].mean() < -0.9
    assert x[2, :, -6:].mean() > 0.9 and x[0, :, -6:].mean() < -0.9


def test_manifest_dataset_filters(manifest):
    assert [ManifestDataset(manifest, 16, split=None)[i]["text"] for i in range(3)] == [
        "zero",
        "one",
        "two",
    ]
    val = ManifestDataset(manifest, 16, split="val")
    assert val.texts == ["two"]
    assert ManifestDataset(manifest, 16, split=None, modality="OCT").texts == ["two"]
    with pytest.raises(ValueError) as info:
        ManifestDataset(manifest, 16, split="test")
    assert str(manifest) in str(info.value) and "split='test'" in str(info.value)
    with pytest.raises(ValueError, match="modality='ct'"):
        ManifestDataset(manifest, 16, split="train", modality="ct")


def test_no_temporary_file_is_left_after_a_failed_write(tmp_path, monkeypatch):
    make_image(tmp_path / "a.png")
    csv = write_csv(tmp_path / "data.csv", "path,Text,modality\na.png,x,fundus\n")
    before = listing(tmp_path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        ingest_csv(csv)
    assert listing(tmp_path) == before
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
