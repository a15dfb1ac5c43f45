"""`medrl demo` end to end at a tiny size: two rating rounds, proxy and gold per version."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from medrl.demo import round_ends

TINY = [
    "data.demo_count=48",
    "data.demo_size=32",
    "model.resolution=32",
    "sampling.num_steps=4",
    "finetune.steps=20",
    "finetune.vae_steps=20",
    "finetune.checkpoint_every=10",
    "finetune.sample_every=20",
    "finetune.batch_size=8",
    "demo.phantom_pool=48",
    "demo.pool_prompts=2",
    "demo.round_prompts=2",
    "demo.round_per_prompt=2",
    "rewards.epochs=2",
    "rewards.stage1_epochs=2",
    "rewards.stage2_epochs=0",
    "rl.iterations=2",
    "rl.num_samplers=1",
    "rl.prompts_per_iteration=2",
    "rl.group_size=4",
    "rl.micro_batch=4",
    "rl.sampler_chunk=4",
    "rl.eval_prompts=2",
    "rl.eval_per_prompt=2",
    "rl.gold_reference=8",
]


def test_round_ends_split_the_iterations():
    assert round_ends(8, 2) == [4, 8]
    assert round_ends(5, 2) == [2, 5]  # Python rounds 2.5 to 2
    assert round_ends(2, 5) == [1, 2]  # never more rounds than iterations
    assert round_ends(4, 1) == [4]


@pytest.mark.slow
def test_demo_runs_two_rating_rounds_and_prints_proxy_and_gold(tmp_path, capsys, monkeypatch):
    from medrl.cli import main

    monkeypatch.setenv("MEDRL_RAY_DASHBOARD", "0")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data, runs = tmp_path / "data", tmp_path / "runs"
    args = ["demo", "--config", "configs/demo.yaml", *TINY, f"data.root={data / 'demo'}",
            f"rewards.ratings_db={data / 'ratings.db'}", f"run.root={runs}"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    run = runs / "demo"
    # the rating store: the phantom pool, the generator's own samples, then the RL round
    with sqlite3.connect(data / "ratings.db") as con:
        rounds = dict(con.execute("SELECT round, COUNT(*) FROM ratings GROUP BY round"))
        paths = [p for (p,) in con.execute("SELECT image_path FROM ratings")]
    assert set(rounds) == {"", "round-1"}, rounds
    assert any(p.startswith("demo-rating-pool/") for p in paths)
    assert any(p.startswith("demo-rating-pool-generated/") for p in paths)
    assert rounds["round-1"] == 4  # 2 prompts x 2 images of the RL adapter, rated blind
    assert (run / "rewards" / "report.json").is_file()
    assert (run / "rewards-round-1" / "report.json").is_file()
    # proxy and gold for every adapter version, across both rounds, and the verdict
    assert "held-out evaluation by adapter version" in out and "verdict:" in out
    table = out.split("held-out evaluation by adapter version")[1].split("verdict:")[0]
    assert [line.split()[0] for line in table.strip().splitlines()[2:]] == ["0", "1", "2"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r.get("stage") == "rl"]
    assert {r["iteration"] for r in rl} == {0, 1, 2}
    assert all("gold_combined" in r and "fd_real" in r for r in rl)
    best = json.loads((run / "rl" / "best" / "adapter_config.json").read_text())
    assert best["selected_by"] == "gold_combined"
    exported = (run / "export" / "pytorch_lora_weights.safetensors").read_bytes()
    assert exported == (run / "rl" / "best" / "pytorch_lora_weights.safetensors").read_bytes()
    assert os.path.isfile(run / "rl" / "eval" / "version-0002.png")
