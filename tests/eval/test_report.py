"""`medrl eval` end to end on a tiny phantom run: metrics.json, report.html, bad inputs."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from eval.charts import curve_series, svg_line_chart
from eval.distances import frechet_distance
from eval.example import write_example
from eval.features import NOT_COMPARABLE_NOTE, FallbackFeatures
from eval.samples import UNKNOWN_PROMPT, find_samples, load_square, round_robin
from generators.datasets import read_manifest
from medrl.cli import main

# Characters that must be escaped in the report.
TEMPLATE = "fundus <{laterality}> eye & {grade}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny CNN training is 40x slower with 2 threads on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def example(tmp_path_factory, one_thread):
    return write_example(tmp_path_factory.mktemp("eval-example"), prompt_template=TEMPLATE)


@pytest.fixture(scope="module")
def evaluated(example):
    rc = main(
        ["eval", str(example.run_dir), "--real", str(example.manifest), "--features", "fallback"]
    )
    metrics = json.loads((example.run_dir / "metrics.json").read_text())
    page = (example.run_dir / "report.html").read_text()
    return rc, metrics, page


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_metrics_json_has_every_section_with_finite_numbers(example, evaluated):
    rc, m, _ = evaluated
    assert rc == 0
    assert m["features"] == {
        "name": "fallback-colour-texture-v1",
        "dim": 249,
        "comparable": False,
        "note": f"features: fallback-colour-texture-v1 — {NOT_COMPARABLE_NOTE}",
    }
    assert m["counts"] == {
        "generated": 16,
        "prompts": 4,
        "real_train": 16,
        "real_holdout": 8,
        "generated_available": 16,
    }
    assert m["arguments"]["features"] == "fallback" and m["arguments"]["near_copy_ssim"] == 0.95
    assert m["command"].startswith("medrl eval ") and "--features fallback" in m["command"]
    d = m["distribution"]
    assert d["label"] == "FD" and _finite(d["fd"], d["kid_mean"], d["kid_std"])
    for section in ("distribution", "prompts", "privacy"):
        assert NOT_COMPARABLE_NOTE in m[section]["note"]

    p = m["prompts"]
    assert _finite(p["fidelity"], p["fidelity_mean"], p["diversity"], p["fbd"])
    assert p["reference"] == "real images of the same prompt"
    assert [r["prompt"] for r in p["per_prompt"]] == example.prompts
    for r in p["per_prompt"]:
        assert r["n_generated"] == 4 and r["n_real_same_text"] == 4
        assert _finite(r["fd"], r["diversity"], r["ssim_generated"], r["ssim_real"])
        assert r["fidelity"] == pytest.approx(1000 / (1 + r["fd"]))
    assert p["agreement"] is None and "not applicable" in p["agreement_note"]

    div = m["diversity"]
    assert _finite(div["generated"]["ssim"], div["real"]["ms_ssim"])
    assert div["real"]["grouping"].startswith("grouped by Text")
    rows = {r["stat"]: r for r in m["fundus"]["rows"]}
    assert set(rows) >= {"snr", "contrast", "sharpness", "vessel_visibility"}
    for r in rows.values():
        assert r["ratio"] == pytest.approx(r["generated_mean"] / r["real_mean"])

    pr = m["privacy"]
    assert _finite(pr["generated_dcr_median"], pr["holdout_dcr_median"], pr["dcr_median_ratio"])
    u = m["utility"]
    assert u["n_real_train"] == 16 and u["n_synthetic"] == 16 and u["n_test"] == 8
    assert u["classes"] == ["0", "2", "3", "4"] and u["chance"] == pytest.approx(0.25)
    for key in ("real", "synthetic", "real_plus_synthetic"):
        assert 0.0 <= u[key] <= 1.0


def test_fd_matches_the_library_on_the_same_images(example, evaluated):
    """The reported FD is frechet_distance of the fallback features of exactly these images."""
    _, m, _ = evaluated
    samples = find_samples(example.run_dir)
    train = read_manifest(example.manifest).query("split == 'train'")
    ext = FallbackFeatures()
    gen = ext(np.stack([load_square(p, 64) for p in samples.paths]))
    real = ext(np.stack([load_square(p, 64) for p in train["path"]]))
    assert m["distribution"]["fd"] == pytest.approx(frechet_distance(gen, real), rel=1e-9)


def test_planted_near_copy_is_flagged_and_a_novel_image_is_not(example, evaluated):
    _, m, page = evaluated
    flagged = {c["sample_id"]: c for c in m["privacy"]["near_copies"]}
    copy = flagged[example.near_copy_id]
    assert copy["train_path"] == example.near_copy_source
    assert copy["ssim"] > 0.95 and any(r.startswith("SSIM") for r in copy["reasons"])
    # fresh phantom draws never pass the SSIM rule; this one passes neither rule
    assert not any(r.startswith("SSIM") for c in flagged.values() if c is not copy
                   for r in c["reasons"])  # fmt: skip
    assert example.novel_ids[-1] not in flagged
    assert m["privacy"]["n_near_copies"] == len(flagged)
    assert f"generated <b>{example.near_copy_id}</b>" in page


def test_report_html_is_self_contained_and_escaped(example, evaluated):
    _, m, page = evaluated
    for prompt in example.prompts:
        assert html.escape(prompt) in page
        assert prompt not in page  # the raw "<right>" never reaches the page
    assert NOT_COMPARABLE_NOTE in page
    uris = re.findall(
        r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="(\d+)"', page
    )
    kinds = [alt for alt, _, _ in uris]
    assert kinds.count("real images") == 4 and kinds.count("generated images") == 4
    assert kinds.count("generated | nearest training image") == m["privacy"]["n_near_copies"]
    grid = Image.open(io.BytesIO(base64.b64decode(uris[0][1])))
    assert grid.format == "PNG" and grid.width > 4 * 64  # 64 px tiles, shown at 128 px
    assert int(uris[0][2]) == round(grid.width * 2)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    # curves: the RL section (reward first, with its std band) comes before VAE and UNet
    rl, vae = page.index('id="rl-curves"'), page.index('id="curves-vae"')
    assert rl < vae < page.index('id="curves-unet"')
    assert page.index('aria-label="reward_mean"') < vae and "<polygon" in page[rl:vae]
    assert "Agreement" in page and "not applicable" in page


def test_curve_series_and_chart_edge_cases():
    recs = [
        {"stage": "unet", "step": 1, "loss": 1.0},
        {"stage": "rl", "iteration": 0, "reward_mean": 0.2, "reward_std": 0.1, "kl": 0.0},
        {"stage": "rl", "iteration": 1, "reward_mean": 0.4, "reward_std": 0.1, "kl": 0.1},
        {"stage": "unet", "step": 1, "loss": 0.5},  # resumed: the last value wins
        {"stage": "unet", "step": 2, "loss": True, "note": "x"},  # not numbers: ignored
    ]
    s = curve_series(recs)
    assert [(c["stage"], c["key"]) for c in s] == [("rl", "reward_mean"), ("rl", "kl"),
                                                    ("unet", "loss")]  # fmt: skip
    assert s[0]["band"] == ([0.1, 0.30000000000000004], [0.30000000000000004, 0.5])
    assert s[2]["x"] == [1.0] and s[2]["y"] == [0.5]
    one = svg_line_chart([3], [float("nan")], "a<b", "step")
    assert "no finite values" in one and "a&lt;b" in one
    dot = svg_line_chart([3], [2.0], "flat", "step")
    assert dot.count("<circle") == 1 and "<polyline" not in dot


def test_a_directory_of_images_is_one_unknown_prompt(example):
    s = find_samples(example.run_dir / "samples" / "images")
    assert s.table is None and len(s.paths) == 16 and set(s.prompts) == {UNKNOWN_PROMPT}


def test_max_images_takes_prompts_in_turn():
    prompts = ["a", "a", "a", "b", "c", "c"]
    assert round_robin(prompts, 4) == [0, 1, 3, 4]
    assert round_robin(prompts, 10) == list(range(6))


def _fresh_run(example, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(example.run_dir / "samples", run / "samples")
    return run


@pytest.mark.parametrize("case", ["missing_manifest", "empty_table", "missing_image"])
def test_bad_input_is_a_clear_error_and_writes_nothing(example, tmp_path, capsys, case):
    run = _fresh_run(example, tmp_path)
    table = run / "samples" / "samples.parquet"
    manifest = example.manifest
    if case == "missing_manifest":
        manifest = tmp_path / "nope" / "manifest.parquet"
        named = str(manifest)
    elif case == "empty_table":
        pd.read_parquet(table).iloc[:0].to_parquet(table, index=False)
        named = str(table)
    else:
        (run / "samples" / "images" / "gen-2-1.png").unlink()
        named = "gen-2-1.png"
    rc = main(["eval", str(run), "--real", str(manifest), "--features", "fallback"])
    err = capsys.readouterr().err
    assert rc != 0
    assert named in err
    assert not (run / "report.html").exists() and not (run / "metrics.json").exists()


def test_cli_report_example_writes_a_report(tmp_path, capsys):
    from medrl.cli import main

    assert main(["dev", "report-example", str(tmp_path / "ex"), "--size", "32"]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "ex" / "runs" / "example" / "report.html"
    assert f"report: {report}" in out and "<html" in report.read_text()[:200].lower()
