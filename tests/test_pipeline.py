"""End to end: every stage at the smoke size on the real embedded model, in
order, in a fresh folder; each output exists and is well-formed, and the
report holds every metric. (The `make demo` run is the same at full size.)"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
import sample  # noqa: E402

STAGES = [["generate.py", "--smoke"], ["rank.py"], ["reward_model.py", "--smoke"], ["dpo.py", "--smoke"],
          ["sample.py", "--smoke"]]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.real
def test_the_whole_pipeline_runs_at_smoke_size_and_writes_every_output(tmp_path):
    shutil.copy(os.path.join(ROOT, "traits.txt"), tmp_path / "traits.txt")
    for stage in STAGES:
        run = subprocess.run([sys.executable, os.path.join(ROOT, stage[0]), *stage[1:]], cwd=tmp_path,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        assert run.returncode == 0, f"{stage[0]} failed:\n{run.stderr[-2000:]}"

    queries = read_jsonl(tmp_path / "data/queries.jsonl")
    assert {q["split"] for q in queries} == {"train", "eval"}
    responses = read_jsonl(tmp_path / "data/responses.jsonl")
    assert all({r["prompt"] for r in rec["responses"]} == {"traits", "plain"} for rec in responses)
    pairs = read_jsonl(tmp_path / "data/preferences.jsonl")
    eval_ids = {q["id"] for q in queries if q["split"] == "eval"}
    assert pairs and not any(p["query_id"] in eval_ids for p in pairs)     # never trains on held-out messages
    for p in pairs:
        assert p["prompt"][0]["role"] == "user" and p["chosen"][0]["role"] == "assistant"
    for folder in ("out/reward_model", "out/dpo"):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (tmp_path / folder / name).exists()

    result = json.load(open(tmp_path / "out/eval.json"))
    figures = result["figures"]
    for setting in sample.SETTINGS + sample.ROBUSTNESS:
        for metric in sample.SOUNDNESS + sample.OWN_VIEW:
            cell = figures[setting][metric]
            # perplexity is measured for the four main settings, the own view for base/plain and tuned/plain only
            measured = ((metric != "perplexity" or setting in sample.SETTINGS) and
                        (metric not in sample.OWN_VIEW or setting in ("base/plain", "tuned/plain")))
            if measured:
                assert set(cell) == {"mean", "std"} and cell["mean"] == cell["mean"]     # present, not NaN
            else:
                assert cell is None
    assert set(result["soundness"]) == set(sample.SOUNDNESS) | {"long loops"}
    for setting in sample.LONG:                                 # the long answers: did they end, did they loop
        assert all(result["long"][setting][m]["mean"] == result["long"][setting][m]["mean"] for m in sample.LONG_FIGURES)
    assert len(result["verdict"]) == 7                          # every trait has a check
    held = {k for k, v in result["verdict"].items() if "held-out" in v}
    assert held == {"1", "2"}                                   # --smoke: messages of the first two traits only
    for k in held:
        v = result["verdict"][k]
        assert isinstance(v["held-out"]["met"], bool) and isinstance(v["general"]["took"], bool)
        cells = result["drop_by_wording"][k]                    # per drop instruction, where it followed a message
        assert cells and all(c["instruction"] in sample.DROP_PERSONA and c["answers"] > 0 for c in cells)
    assert len(result["seeds"]) >= 3
    report = open(tmp_path / "out/report.md").read()
    for heading in ("## Verdict", "### Under each drop-your-persona instruction", "## Soundness", "## The training's own view", "## Training curves"):
        assert heading in report
    assert "| 1 | " in report.split("## Training curves")[1]          # the DPO curve has its numbers, not "-"
    for picture in ("checks.svg", "training_curves.svg"):        # the pictures the report shows, beside it
        assert f"]({picture})" in report and (tmp_path / "out" / picture).read_text().startswith("<svg")
    samples = read_jsonl(tmp_path / "out/samples.jsonl")
    assert {s["setting"] for s in samples} == set(sample.SETTINGS + sample.ROBUSTNESS + sample.LONG)
    long = [s for s in samples if s["setting"] in sample.LONG]
    assert {s["limit"] for s in long} == {24} and max(len(s["ids"]) for s in long) <= 24     # --smoke: 24 long tokens
    assert max(len(s["ids"]) for s in long) > 12 and len(long) == 2 * result["n_eval_messages"]  # past the 12 of the rest
