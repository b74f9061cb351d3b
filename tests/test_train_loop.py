"""The shared training loop (train_loop.py): schedule, data order, input
checks, exact resume after a kill, DDP with two processes, NaN handling.
The stage scripts run on the tiny random model (fixture `tiny_model_dir`)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import model as M
import train_loop as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ["cats", "the sea", "music", "trees", "chess", "bread", "rain", "stars", "bikes", "tea", "maps", "clocks",
          "rivers", "owls", "paint", "snow", "jazz", "bees", "boats", "kites", "glass", "salt", "wolves", "moss"]


def write_pairs(path, n_messages=12, pairs_per_message=2, extra=None):
    """A hand-made preferences file in rank.py's format."""
    with open(path, "w") as f:
        for i in range(n_messages):
            t = TOPICS[i % len(TOPICS)]
            for j in range(pairs_per_message):
                pair = {"id": f"q{i}-{j}", "query_id": f"q{i}", "trait": "warm",
                        "prompt": [{"role": "user", "content": f"What do you think of {t}?"}],
                        "chosen": [{"role": "assistant", "content": f"I love {t}! Thank you for asking, friend {j}."}],
                        "rejected": [{"role": "assistant", "content": f"{t} are boring. Go away {j}."}],
                        "score_chosen": 1.0, "score_rejected": 0.0, "margin": 1.0, "judge": "hand", "traits_sha": "x"}
                pair.update(extra or {})
                f.write(json.dumps(pair) + "\n")
    return str(path)


def run_stage(script, *args, launcher=(sys.executable,), check=True):
    """Run a stage script; returns the completed process."""
    result = subprocess.run([*launcher, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------

def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_ratio():
    total, warmup, peak = 100, 10, 1e-3
    lrs = [T.lr_at(s, total, warmup, peak, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(0.1 * peak)
    middle = warmup + (total - warmup - 1) / 2     # half-way through the decay: half-way between peak and floor
    assert T.lr_at(int(middle), total, warmup, peak, 0.1) == pytest.approx(0.55 * peak, rel=0.03)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


def test_data_order_covers_each_example_once_per_epoch_and_depends_only_on_seed_and_step():
    n, batch = 10, 4
    stream = [i for step in range(5) for i in T.step_examples(step, n, batch, seed=3)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]                        # a new shuffle each epoch
    assert T.step_examples(3, n, batch, seed=3) == stream[12:16]
    assert T.step_examples(3, n, batch, seed=4) != stream[12:16]


def test_micro_batches_split_a_step_between_processes_without_overlap():
    indices, lengths = list(range(8)), [5, 1, 7, 3, 2, 8, 6, 4]
    parts = [T.micro_batches(indices, lengths, rank, 2, 3) for rank in range(2)]
    seen = [i for p in parts for mb in p for i in mb]
    assert sorted(seen) == indices
    assert all(len(mb) <= 3 for p in parts for mb in p)
    for p in parts:                                            # sorted by length: little padding
        flat = [i for mb in p for i in mb]
        assert [lengths[i] for i in flat] == sorted(lengths[i] for i in flat)


def test_split_by_query_never_puts_one_message_on_both_sides(tmp_path):
    pairs = T.read_preferences(write_pairs(tmp_path / "p.jsonl", n_messages=10, pairs_per_message=3))
    train, held = T.split_by_query(pairs, 0.3, seed=0)
    assert len(train) + len(held) == len(pairs)
    assert {p["query_id"] for p in train}.isdisjoint({p["query_id"] for p in held})
    assert len({p["query_id"] for p in held}) == 3


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "empty file"),
    ('{"id": 1}\nnot json\n', ":1: missing field query_id"),
    ("GOOD\n{broken\n", ":2: not valid JSON"),
    ('{"id": "a", "query_id": "q", "prompt": [], "chosen": [], "rejected": []}\n', ":1: 'prompt' must be"),
])
def test_bad_preferences_raise_one_clear_error_with_the_line(tmp_path, content, message):
    path = tmp_path / "prefs.jsonl"
    if content is not None:
        good = open(write_pairs(tmp_path / "good.jsonl", 1, 1)).read().strip()
        path.write_text(content.replace("GOOD", good))
    with pytest.raises(T.DataError, match=message):
        T.read_preferences(str(path))


def test_stage_reports_bad_input_as_one_line_without_traceback(tmp_path, tiny_model_dir):
    path = tmp_path / "prefs.jsonl"
    path.write_text(open(write_pairs(tmp_path / "good.jsonl", 2, 1)).read() + "{oops\n")
    result = run_stage("dpo.py", "--model", tiny_model_dir, "--preferences", path, "--traits", "",
                       "--out", tmp_path / "out", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"dpo.py: {path}:3: not valid JSON (Expecting property name enclosed in double quotes)"]


# ----------------------------------------------------------------------------
# Resume, DDP, NaN

# fp32: the property is about the split of the work; bf16 autocast (the default on CPUs with AMX)
# rounds each process's partial sums differently.
COMMON = ["--traits", "", "--heldout-fraction", "0", "--lr", "1e-3", "--batch-size", "4", "--dtype", "fp32"]


def test_resume_after_kill_gives_the_same_weights_and_metrics_as_an_uninterrupted_run(tmp_path, tiny_model_dir):
    prefs = write_pairs(tmp_path / "p.jsonl")
    args = ["--model", tiny_model_dir, "--preferences", prefs, *COMMON, "--max-steps", 5, "--save-every", 2]
    run_stage("dpo.py", *args, "--out", tmp_path / "straight")
    killed = run_stage("dpo.py", *args, "--out", tmp_path / "killed", "--kill-at-step", 3, check=False)
    assert killed.returncode == -9                                  # SIGKILL after step 3: last checkpoint at step 2
    assert T.checkpoint_state(tmp_path / "killed" / "checkpoint")["step"] == 2
    resumed = run_stage("dpo.py", *args, "--out", tmp_path / "killed")
    assert "resuming from" in resumed.stderr and "read from the cache" in resumed.stderr
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [r["step"] for r in mb] == [1, 2, 3, 4, 5]               # step 3's line was cut, then written once
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    assert not os.path.exists(tmp_path / "killed" / "checkpoint")  # a finished run removes its checkpoint


def test_a_checkpoint_this_network_cannot_take_is_refused_in_one_line_and_kept(tmp_path, tiny_model_dir):
    """A checkpoint whose tensors this network has not (one made before W_q, W_k
    and W_v were separate matrices named "qkv_proj") gets one error line naming
    --no-resume; the checkpoint stays where it was."""
    from safetensors.torch import save_file
    prefs = write_pairs(tmp_path / "p.jsonl")
    args = ["--model", tiny_model_dir, "--preferences", prefs, *COMMON, "--max-steps", 5, "--save-every", 2,
            "--out", tmp_path / "out"]
    assert run_stage("dpo.py", *args, "--kill-at-step", 3, check=False).returncode == -9
    path = tmp_path / "out" / "checkpoint" / "trainable.safetensors"
    saved = load_file(path)
    saved["layers.0.self_attn.qkv_proj.weight"] = saved.pop("layers.0.self_attn.q_proj.weight")
    save_file(saved, path)
    resumed = run_stage("dpo.py", *args, check=False)
    assert resumed.returncode == 1
    assert resumed.stderr.strip().splitlines()[-1].startswith("dpo.py: ") and "--no-resume" in resumed.stderr
    assert "Traceback" not in resumed.stderr and T.checkpoint_state(tmp_path / "out" / "checkpoint")["step"] == 2


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    prefs = write_pairs(tmp_path / "p.jsonl")
    args = ["--model", tiny_model_dir, "--preferences", prefs, *COMMON, "--max-steps", 3]
    run_stage("dpo.py", *args, "--micro-batch", 2, "--out", tmp_path / "one")
    run_stage("dpo.py", *args, "--micro-batch", 1, "--out", tmp_path / "two",
              launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"))
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = weights(tiny_model_dir)
    changed = [k for k in a if not torch.equal(a[k], start[k])]
    assert changed, "training changed no weight"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la, lb = [r["loss"] for r in metrics(tmp_path / "one")], [r["loss"] for r in metrics(tmp_path / "two")]
    assert la == pytest.approx(lb, rel=1e-5)
    assert json.load(open(tmp_path / "two" / "training.json"))["processes"] == 2


def test_nan_loss_stops_training_with_a_message_and_keeps_the_last_checkpoint(tmp_path, tiny_model, capsys, monkeypatch):
    import dpo
    prefs = write_pairs(tmp_path / "p.jsonl")
    real_make_loss_fn = dpo.make_loss_fn
    calls = {"n": 0}

    def poisoned(args, device):                  # the loss of the 4th step (micro batches 7, 8) is NaN
        loss_fn = real_make_loss_fn(args, device)

        def loss(model, batch):
            calls["n"] += 1
            value, m = loss_fn(model, batch)
            return (value * float("nan") if calls["n"] == 7 else value), m
        return loss
    monkeypatch.setattr(dpo, "make_loss_fn", poisoned)
    monkeypatch.setattr(M, "load_model", lambda *a, **k: tiny_model)
    out = tmp_path / "out"
    code = dpo.main(["--preferences", prefs, *COMMON, "--max-steps", "6", "--save-every", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("dpo.py: the loss became NaN or infinite at step 4; training stopped and the last good "
                              f"checkpoint (step 2) in {out}/checkpoint is intact")
    state = T.checkpoint_state(out / "checkpoint")
    assert state["step"] == 2
    saved = load_file(out / "checkpoint" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]           # nothing logged for the bad step


def test_frozen_matrices_cast_once_give_the_same_training_and_come_back_exact(tmp_path, tiny_model_dir, monkeypatch):
    """In bf16, frozen matrices (the tied output layer too) are cast once
    instead of in every forward: the trained weights are bit for bit those of
    plain autocast, and the frozen matrices are back in fp32, unchanged, when
    training ends."""
    import dpo
    prefs = write_pairs(tmp_path / "p.jsonl")
    args = ["--preferences", prefs, "--traits", "", "--heldout-fraction", "0", "--lr", "1e-3", "--batch-size", "4",
            "--dtype", "bf16", "--train-layers", "1", "--max-steps", "3"]
    trained = {}
    for name, cast in [("once", T.cast_frozen_matrices), ("autocast", lambda model, dtype: {})]:
        model = M.load_model(tiny_model_dir, "cpu")
        monkeypatch.setattr(M, "load_model", lambda *a, _m=model, **k: _m)
        monkeypatch.setattr(T, "cast_frozen_matrices", cast)
        assert dpo.main([*args, "--out", str(tmp_path / name)]) in (0, None)
        trained[name] = model
        monkeypatch.undo()
    start = M.load_model(tiny_model_dir, "cpu").state_dict()
    once, plain = trained["once"].state_dict(), trained["autocast"].state_dict()
    assert all(torch.equal(once[k], plain[k]) for k in once)
    frozen = "layers.0.self_attn.q_proj.weight"
    assert once[frozen].dtype == torch.float32 and torch.equal(once[frozen], start[frozen])
    assert not torch.equal(once["layers.1.mlp.down_proj.weight"], start["layers.1.mlp.down_proj.weight"])
    assert trained["once"].cfg.tie_embeddings and trained["once"].output_weight is None   # the bf16 output copy is gone


def test_frozen_matrices_come_back_in_fp32_when_training_stops_on_a_nan(tmp_path, tiny_model_dir, monkeypatch):
    """The fp32 originals are put back however training ends, not only when it finishes."""
    import dpo
    prefs = write_pairs(tmp_path / "p.jsonl")
    model = M.load_model(tiny_model_dir, "cpu")
    monkeypatch.setattr(M, "load_model", lambda *a, **k: model)
    real_make_loss_fn = dpo.make_loss_fn
    monkeypatch.setattr(dpo, "make_loss_fn", lambda args, device: (
        lambda m, batch: (lambda value, metrics: (value * float("nan"), metrics))(*real_make_loss_fn(args, device)(m, batch))))
    code = dpo.main(["--preferences", prefs, "--traits", "", "--heldout-fraction", "0", "--batch-size", "4",
                     "--dtype", "bf16", "--train-layers", "1", "--max-steps", "2", "--out", str(tmp_path / "out")])
    assert code == 1
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.float32 and model.output_weight is None
