"""benchmarks/paper_in_miniature.py at a tiny scale: every stage trains and is evaluated, the JSON has
the issue's schema, finished stages are reused only when nothing changed, reruns give the same rows."""
import importlib.util
import json
import os
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("paper_in_miniature", ROOT / "benchmarks" / "paper_in_miniature.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_stage_ablation_draws_what_the_two_stages_draw():
    paper = _load()
    corpus = {k: f"/d/{k}.jsonl" for k in ("base", "stage1_reasoning", "stage2_general", "stage2_reasoning", "dpo")}
    plan = paper.scaled_plan(1.0)
    s1, s2 = plan["stage1"]["steps"], plan["stage2"]["steps"]
    assert plan["one_stage"] == {"steps": s1 + s2, "lr": plan["stage1"]["lr"]}
    _, argv = paper.stage_args("one_stage", "/o", corpus, 1)
    sources = argv[argv.index("--data.sources") + 1]
    # Weights in samples drawn: stage 1's steps of reasoning, stage 2's steps split 340 : 550.
    assert f"{{path: /d/stage1_reasoning.jsonl, weight: {s1}}}" in sources
    assert f"weight: {s2 * 340 / 890}}}" in sources and f"weight: {s2 * 550 / 890}}}" in sources
    _, argv = paper.stage_args("stage2", "/o", corpus, 1)
    assert argv[argv.index("--model.init_from") + 1] == "/o/stage1/hf"
    assert "weight: 340" in argv[argv.index("--data.sources") + 1]
    _, argv = paper.stage_args("dpo", "/o", corpus, 1)
    assert argv[argv.index("--model.init_from") + 1] == "/o/stage2/hf"


def test_smoke_run_schema_reuse_and_rerun(tmp_path):
    paper = _load()
    args = ["--out-dir", str(tmp_path / "runs"), "--scale", "0.005", "-n", "3", "--max-new-tokens", "6",
            "--threads", "1"]
    out1, out2, out3 = (tmp_path / f"r{i}.json" for i in (1, 2, 3))
    port_before = os.environ.get("MASTER_PORT")
    assert paper.main(args + ["--json", str(out1), "--plot", str(tmp_path / "p.png")]) == 0
    # No process group (and no port in the environment) outlives the run: a later torchrun-style
    # child would inherit MASTER_PORT and fail to bind it.
    assert not torch.distributed.is_initialized() and os.environ.get("MASTER_PORT") == port_before
    rec = json.loads(out1.read_text())
    assert set(rec) >= {"commit", "date", "rows"}
    assert [r["model"] for r in rec["rows"]] == ["base", "stage1", "stage2", "dpo", "one_stage"]
    for r in rec["rows"]:
        assert set(r) == {"model", "reasoning", "instruction_following", "tool_use", "knowledge", "format_errors", "n"}
        assert r["n"] == 3 and 0 <= r["format_errors"] <= 12 and isinstance(r["format_errors"], int)
        assert all(0.0 <= r[c] <= 1.0 for c in ("reasoning", "instruction_following", "tool_use", "knowledge"))
    plan = rec["plan"]
    assert plan["base"]["steps"] == max(2, round(paper.PLAN["base"]["steps"] * 0.005))
    assert plan["one_stage"]["steps"] == plan["stage1"]["steps"] + plan["stage2"]["steps"]
    # Unchanged settings: every stage is reused (no training time), and the table is the same.
    assert paper.main(args + ["--json", str(out2), "--plot", ""]) == 0
    rec2 = json.loads(out2.read_text())
    assert all(v == 0.0 for v in rec2["train_seconds"].values()) and rec2["rows"] == rec["rows"]
    # A fresh rerun retrains everything from the same seeds: the same table again.
    assert paper.main(args + ["--json", str(out3), "--plot", "", "--fresh"]) == 0
    rec3 = json.loads(out3.read_text())
    assert all(v > 0 for v in rec3["train_seconds"].values()) and rec3["rows"] == rec["rows"]
