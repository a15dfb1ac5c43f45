"""Label converters: public fundus datasets' label files -> our data CSV, through prompt templates.

``convert_labels("eyepacs", "trainLabels.csv", image_dir="train")`` writes
``path,Text,modality,split,source_dataset,label,laterality,patient_id`` rows such as
``train/10_left.jpeg,"colour fundus photograph, left eye, no diabetic retinopathy",fundus,...``.
Every converter, its expected columns and an example are in docs/data.md. Bad values are
collected over the whole file and raised together (:class:`DataValidationError`, line
numbers as in the label file, header = line 1); then nothing is written.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from generators.config import SPLITS
from generators.csv_rows import DataValidationError, RowProblem, read_csv_rows
from generators.datasets import COLUMNS
from generators.images import IMAGE_SUFFIXES
from runfiles import atomic_write_text

log = logging.getLogger(__name__)

#: International Clinical Diabetic Retinopathy (ICDR) severity scale, as prompt words.
ICDR_GRADES: dict[int, str] = {
    0: "no diabetic retinopathy",
    1: "mild non-proliferative diabetic retinopathy",
    2: "moderate non-proliferative diabetic retinopathy",
    3: "severe non-proliferative diabetic retinopathy",
    4: "proliferative diabetic retinopathy",
}

#: Messidor-2 adjudicated DME (referable diabetic macular edema, 0/1), as prompt words.
MESSIDOR_DME: dict[int, str] = {0: "no diabetic macular edema", 1: "diabetic macular edema"}

#: AIROGS classes, as prompt words.
AIROGS_CLASSES: dict[str, str] = {"RG": "referable glaucoma", "NRG": "no referable glaucoma"}

#: ODIR keywords that mark an image that is not a fundus photograph (rows skipped).
#: "no fonndus image" is spelled so in the ODIR-5K annotations.
ODIR_NON_FUNDUS: frozenset[str] = frozenset(
    {"anterior segment image", "no fundus image", "no fonndus image"}
)

#: Prompt templates, one per dataset. Fields: ``eye`` ("left eye", "right eye" or empty),
#: ``dr`` (ICDR_GRADES words), ``dme_risk`` (IDRiD 0-2), ``dme`` (MESSIDOR_DME words),
#: ``keywords`` (ODIR diagnostic keywords of that eye), ``patient`` (ODIR "69-year-old
#: female"), ``glaucoma`` (AIROGS_CLASSES words). Comma-separated parts that come out
#: empty are dropped, so an unknown eye gives "colour fundus photograph, <finding>".
PROMPT_TEMPLATES: dict[str, str] = {
    "eyepacs": "colour fundus photograph, {eye}, {dr}",
    "aptos": "colour fundus photograph, {eye}, {dr}",
    "idrid": "colour fundus photograph, {eye}, {dr}, diabetic macular edema risk {dme_risk}",
    "odir": "colour fundus photograph, {eye}, {keywords}, {patient}",
    "messidor2": "colour fundus photograph, {eye}, {dr}, {dme}",
    "airogs": "colour fundus photograph, {eye}, {glaucoma}",
}


def render_prompt(template: str, **fields: object) -> str:
    """Fill a template and drop comma-separated parts that came out empty."""
    text = template.format(**fields)
    return ", ".join(part for part in text.split(", ") if part.strip())


# --------------------------------------------------------------------------- row helpers


@dataclass
class Sample:
    """One output row before the image directory is prefixed."""

    image: str
    text: str
    label: str
    laterality: str = "unknown"
    patient_id: str = ""


@dataclass
class _Row:
    """Values of one label-file row, and the problems and skip reason found in it."""

    line: int
    values: dict[str, str]
    problems: list[RowProblem] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)  # why (parts of) the row were left out

    def get(self, column: str) -> str:
        return self.values.get(column, "").strip()

    def bad(self, column: str, reason: str) -> None:
        self.problems.append(RowProblem(self.line, column, reason))

    def required(self, column: str, what: str) -> str:
        value = self.get(column)
        if not value:
            self.bad(column, f"{what} is empty")
        return value

    def integer(self, column: str, allowed: range, what: str) -> int | None:
        """An integer in ``allowed`` ("2" and "2.0" both read as 2), else a problem."""
        text = self.get(column)
        span = f"{allowed.start} to {allowed.stop - 1}"
        if not text:
            self.bad(column, f"{what} is empty; must be {span}")
            return None
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if number.is_integer() and int(number) in allowed:
            return int(number)
        self.bad(column, f"{what} {text!r} is not valid; must be {span}")
        return None


def _eye(laterality: str) -> str:
    return f"{laterality} eye" if laterality in ("left", "right") else ""


def _eyepacs(row: _Row) -> list[Sample]:
    image = row.required("image", "image id")
    grade = row.integer("level", range(5), "grade")
    match = re.fullmatch(r"(.+?)_(left|right)", image, flags=re.IGNORECASE)
    if image and not match:
        row.bad("image", f"image id {image!r} does not end in _left or _right")
    if row.problems or not match:
        return []
    laterality = match.group(2).lower()
    text = render_prompt(PROMPT_TEMPLATES["eyepacs"], eye=_eye(laterality), dr=ICDR_GRADES[grade])
    return [Sample(image, text, str(grade), laterality, match.group(1))]


def _aptos(row: _Row) -> list[Sample]:
    image = row.required("id_code", "image id")
    grade = row.integer("diagnosis", range(5), "grade")
    if row.problems:
        return []
    text = render_prompt(PROMPT_TEMPLATES["aptos"], eye="", dr=ICDR_GRADES[grade])
    return [Sample(image, text, str(grade))]


def _idrid(row: _Row) -> list[Sample]:
    image = row.required("Image name", "image name")
    grade = row.integer("Retinopathy grade", range(5), "retinopathy grade")
    risk = row.integer("Risk of macular edema", range(3), "macular edema risk")
    if row.problems:
        return []
    text = render_prompt(PROMPT_TEMPLATES["idrid"], eye="", dr=ICDR_GRADES[grade], dme_risk=risk)
    return [Sample(image, text, str(grade))]


def _odir_keywords(text: str) -> list[str]:
    # ODIR separates keywords with a full-width comma (U+FF0C), sometimes an ASCII one.
    return [k.strip() for k in re.split(r"[,\uff0c]", text) if k.strip()]


def _odir(row: _Row) -> list[Sample]:
    patient = row.required("ID", "patient ID")
    age_text, sex_text = row.get("Patient Age"), row.get("Patient Sex")
    age = row.integer("Patient Age", range(131), "age") if age_text else None
    sex = sex_text.lower()
    if sex and sex not in ("male", "female"):
        row.bad("Patient Sex", f"sex {sex_text!r} is not Male or Female")
    who = f"{age}-year-old {sex or 'patient'}" if age is not None else sex
    samples = []
    for laterality, side in (("left", "Left"), ("right", "Right")):
        image = row.required(f"{side}-Fundus", f"{laterality} fundus image name")
        words = _odir_keywords(row.get(f"{side}-Diagnostic Keywords"))
        if not words:
            row.bad(f"{side}-Diagnostic Keywords", f"{laterality} eye keywords are empty")
            continue
        if ODIR_NON_FUNDUS & {w.lower() for w in words}:
            row.skips.append(
                "eye image is not a fundus photograph (ODIR keyword "
                + ", ".join(sorted(ODIR_NON_FUNDUS & {w.lower() for w in words}))
                + ")"
            )
            continue
        keywords = ", ".join(words)
        text = render_prompt(
            PROMPT_TEMPLATES["odir"], eye=_eye(laterality), keywords=keywords, patient=who
        )
        samples.append(Sample(image, text, keywords, laterality, patient))
    return [] if row.problems else samples


def _messidor2(row: _Row) -> list[Sample]:
    image = row.required("image_id", "image id")
    gradable = row.integer("adjudicated_gradable", range(2), "gradable flag")
    if gradable == 0:
        row.skips.append("ungradable image (adjudicated_gradable = 0)")
        return []
    grade = row.integer("adjudicated_dr_grade", range(5), "grade")
    dme = row.integer("adjudicated_dme", range(2), "DME flag")
    if row.problems:
        return []
    text = render_prompt(
        PROMPT_TEMPLATES["messidor2"], eye="", dr=ICDR_GRADES[grade], dme=MESSIDOR_DME[dme]
    )
    return [Sample(image, text, str(grade))]


def _airogs(row: _Row) -> list[Sample]:
    image = row.required("challenge_id", "challenge id")
    cls = row.get("class").upper()
    if cls not in AIROGS_CLASSES:
        row.bad("class", f"class {row.get('class')!r} is not valid; must be RG or NRG")
    if row.problems:
        return []
    text = render_prompt(PROMPT_TEMPLATES["airogs"], eye="", glaucoma=AIROGS_CLASSES[cls])
    return [Sample(image, text, cls)]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Converter:
    """How one public dataset's label file maps to our rows."""

    name: str
    label_file: str  # the file's name as distributed
    columns: tuple[str, ...]  # source columns read (header match ignores case and spaces)
    ext: str  # image extension appended when the id has none
    convert_row: Callable[[_Row], list[Sample]]
    note: str = ""


CONVERTERS: dict[str, Converter] = {
    c.name: c
    for c in (
        Converter("eyepacs", "trainLabels.csv", ("image", "level"), ".jpeg", _eyepacs),
        Converter("aptos", "train.csv", ("id_code", "diagnosis"), ".png", _aptos),
        Converter(
            "idrid",
            "IDRiD_Disease Grading_Training Labels.csv",
            ("Image name", "Retinopathy grade", "Risk of macular edema"),
            ".jpg",
            _idrid,
        ),
        Converter(
            "odir",
            "ODIR-5K_Training_Annotations(Updated)_V2.xlsx exported to CSV",
            (
                "ID",
                "Patient Age",
                "Patient Sex",
                "Left-Fundus",
                "Right-Fundus",
                "Left-Diagnostic Keywords",
                "Right-Diagnostic Keywords",
            ),
            ".jpg",
            _odir,
            note="one row per eye; N,D,G,C,A,H,M,O are patient-level and not used",
        ),
        Converter(
            "messidor2",
            "messidor_data.csv",
            ("image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"),
            ".png",
            _messidor2,
            note="ungradable rows are skipped",
        ),
        Converter("airogs", "train_labels.csv", ("challenge_id", "class"), ".jpg", _airogs),
    )
}


def _image_name(image: str, ext: str) -> str:
    return image if PurePosixPath(image).suffix.lower() in IMAGE_SUFFIXES else image + ext


def convert_labels(
    dataset: str,
    labels: Path | str,
    out: Path | str | None = None,
    image_dir: str = "",
    ext: str | None = None,
    split: str = "train",
) -> Path:
    """Convert a public dataset's label file into our data CSV; returns the CSV path.

    Args:
        dataset: a key of :data:`CONVERTERS` (eyepacs, aptos, idrid, odir, messidor2, airogs).
        labels: the label file as distributed (CSV; ODIR's .xlsx must be exported to CSV).
        out: output CSV; default ``data.csv`` beside ``labels``. Image paths in it are
            relative to its folder, the dataset root of `medrl data ingest`.
        image_dir: image folder relative to that root, prefixed to every image name.
        ext: extension appended to ids that have none (default per dataset).
        split: the split every row gets.

    Raises:
        DataValidationError: missing columns or bad values (all listed; nothing written).
    """
    if dataset not in CONVERTERS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(CONVERTERS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    conv = CONVERTERS[dataset]
    labels = Path(labels)
    out_path = Path(out) if out is not None else labels.parent / "data.csv"
    folder = _image_folder(image_dir, out_path)
    extension = conv.ext if ext is None else ext
    if extension and not extension.startswith("."):
        extension = "." + extension

    header, raw_rows = read_csv_rows(labels)
    index = _column_index(header, conv, labels)
    out_rows, skipped, source_rows = _convert_rows(
        labels, raw_rows, index, conv, folder, extension, split
    )
    for reason, count in skipped.items():
        log.info("%s: skipped %d: %s", labels.name, count, reason)
    if not out_rows:
        raise ValueError(f"{labels}: no rows to write ({source_rows} rows read, all skipped)")
    _write_data_csv(out_path, out_rows)
    log.info(
        "%s: %d label rows -> %d images in %s", labels.name, source_rows, len(out_rows), out_path
    )
    return out_path


def _image_folder(image_dir: str, out_path: Path) -> str:
    """The image folder as a relative POSIX prefix; ValueError if it is absolute."""
    folder = image_dir.replace("\\", "/").strip().rstrip("/")
    if folder.startswith("/") or os.path.isabs(folder):
        raise ValueError(
            f"image_dir {image_dir!r} must be relative to the dataset root ({out_path.parent})"
        )
    return folder


def _column_index(header: list[str], conv: Converter, labels: Path) -> dict[str, int]:
    """Lower-cased header name -> first position; DataValidationError if a column is missing."""
    index: dict[str, int] = {}
    for i, name in enumerate(header):
        if name:
            index.setdefault(name.lower(), i)
    missing = [c for c in conv.columns if c.lower() not in index]
    if missing:
        raise DataValidationError(
            labels,
            [
                RowProblem(
                    1,
                    "header",
                    f"missing column(s) {', '.join(repr(c) for c in missing)}: a {conv.name} "
                    f"{conv.label_file} has {','.join(conv.columns)}; "
                    f"this file has {','.join(h for h in header if h)}",
                )
            ],
        )
    return index


def _convert_rows(
    labels: Path,
    raw_rows: Iterable[tuple[int, list[str]]],
    index: dict[str, int],
    conv: Converter,
    folder: str,
    extension: str,
    split: str,
) -> tuple[list[list[str]], Counter[str], int]:
    """Convert every label row: (output rows, skip reasons counted, label rows read).

    Raises:
        DataValidationError: any bad value or duplicate image, all of them listed.
    """
    problems: list[RowProblem] = []
    skipped: Counter[str] = Counter()
    out_rows: list[list[str]] = []
    first_line: dict[str, int] = {}
    source_rows = 0
    for line, cells in raw_rows:
        source_rows += 1
        values = {
            c: cells[index[c.lower()]] if index[c.lower()] < len(cells) else ""
            for c in conv.columns
        }
        row = _Row(line, values)
        samples = conv.convert_row(row)
        skipped.update(row.skips)
        for s in samples:
            path = "/".join(p for p in (folder, _image_name(s.image, extension)) if p)
            if path in first_line:
                row.bad("image", f"duplicate image {path!r}, first on line {first_line[path]}")
                continue
            first_line[path] = line
            out_rows.append(
                [path, s.text, "fundus", split, conv.name, s.label, s.laterality, s.patient_id]
            )
        problems += row.problems
    if problems:
        raise DataValidationError(labels, problems)
    return out_rows, skipped, source_rows


def _write_data_csv(out_path: Path, out_rows: list[list[str]]) -> None:
    """Write our data CSV (header :data:`COLUMNS`, then the rows) atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(out_rows)
    atomic_write_text(out_path, buffer.getvalue())
