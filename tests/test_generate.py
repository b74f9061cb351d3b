"""Tests of generate.py (stages 1+2): the traits file, the message filters, the
output files, resuming after kill -9, torchrun sharding, errors and --help.
All but the last use the tiny random model; the last runs both stages
(generate.py and rank.py) on the real embedded model at the smallest sizes."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import character as C
import generate as G
from stage_files import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_TRAITS = """# two small traits for the tiny-model tests
I speak like a pirate.
- How do I boil an egg?
- What is the weather like today?
- Can you recommend a book?
opposite: I speak plainly, with no pirate words.

I answer in rhyme.
- What is the capital of France?
- How do plants grow?
- Why is the sky blue?
opposite: I never rhyme.
"""

# Small sizes: 2 traits x 3 seeds (the tiny model writes no usable new messages),
# 3 answers each, one message per unit of work (6 units).
TINY_FLAGS = ["--new-per-trait", "1", "--list-samples", "1", "--list-tokens", "16", "--eval-messages", "0", "--answers", "3",
              "--max-new-tokens", "16", "--batch-size", "3", "--top-p", "1.0"]


def write_traits(folder, text=TINY_TRAITS):
    path = os.path.join(folder, "traits.txt")
    with open(path, "w") as f:
        f.write(text)
    return path


def gen_argv(folder, model_dir, extra=()):
    d = str(folder)
    return ["--model", model_dir, "--traits", os.path.join(d, "traits.txt"), "--queries", os.path.join(d, "queries.jsonl"),
            "--responses", os.path.join(d, "responses.jsonl"), "--report", os.path.join(d, "generate_report.json"),
            *TINY_FLAGS, *extra]


class one_thread:
    """Run in-process stages on one thread, like the subprocesses below
    (OMP_NUM_THREADS=1): same kernels, bit-identical results; and no
    oversubscription of this machine's two shared cores."""
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def script_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def run_script(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=300, **kwargs)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def kill_when_units_written(cmd, partial, min_units=1, timeout=120):
    """Start a stage, kill -9 it as soon as `partial` holds min_units finished
    units; returns how many units were on disk then."""
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(partial):
                with open(partial, "rb") as f:
                    if f.read().count(b"\n") >= 1 + min_units:      # header + units
                        proc.send_signal(signal.SIGKILL)
                        break
            time.sleep(0.005)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    with open(partial, "rb") as f:
        return f.read().count(b"\n") - 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """An uninterrupted single-process run on the tiny model: the outputs every other run must equal."""
    folder = tmp_path_factory.mktemp("gen_reference")
    write_traits(str(folder))
    with one_thread():
        G.main(gen_argv(folder, tiny_model_dir))
    return folder


# ----------------------------------------------------------------------------
# The traits files
# ----------------------------------------------------------------------------

BAD_TRAITS = {
    "missing": (None, "no such file"),
    "empty": ("", "no traits found"),
    "only comments": ("# nothing here\n\n", "no traits found"),
    "seed before trait": ("- How are you?\nI am kind.\n", "line 1: a block must start with the trait"),
    "trait with no text": ("...\n- How are you?\n", "line 1: the trait has no text"),
    "malformed line": ("I am kind.\n- How are you?\nthis line is not a seed\n", "line 3: expected a seed message"),
    "bad check pattern": ("I am kind.\n- How are you?\ncheck: (unclosed\n", "line 3: the 'check:' pattern is not a valid regular"),
    "check before any trait": ("check: kind\n\nI am kind.\n- Hi?\n", "line 1: a 'check:' line must follow a trait"),
    "two roles for one trait": ("I am kind.\n- Hi?\nrole: You are kind.\nrole: You are nice.\n", "line 4: a second 'role:' line"),
    "no seeds": ("I am kind.\n\nI am brief.\n- Hi?\n", "line 1: the trait has no seed messages"),
    "empty seed": ("I am kind.\n- \n", "line 2: empty seed message"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAITS))
def test_bad_traits_file_is_refused_with_one_line(case, tmp_path, capsys):
    """A missing, empty or malformed traits file, or a trait with no text: one error line naming the file (and line), exit != 0."""
    content, expected = BAD_TRAITS[case]
    path = os.path.join(str(tmp_path), "traits.txt")
    if content is not None:
        with open(path, "w") as f:
            f.write(content)
    with pytest.raises(SystemExit) as e:
        G.main(["--traits", path, "--model", "unused"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"generate.py: {path}") and expected in err[0], err


def test_bad_input_in_a_real_process_no_traceback_nothing_deleted(tmp_path):
    """As a process: exit status 1, a single stderr line, no traceback; existing outputs are left alone."""
    write_traits(str(tmp_path), "I am kind.\n- Hi?\nnot a seed line\n")
    queries = os.path.join(str(tmp_path), "queries.jsonl")
    with open(queries, "w") as f:
        f.write('{"made": "earlier"}\n')
    r = run_script(["generate.py", "--traits", os.path.join(str(tmp_path), "traits.txt"), "--queries", queries])
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr and "line 3" in r.stderr
    assert read_bytes(queries) == b'{"made": "earlier"}\n'


# ----------------------------------------------------------------------------
# Stage 1: the message filters
# ----------------------------------------------------------------------------

def test_numbered_list_continuation_is_split_into_items():
    """The continuation after "4." is split at the numbers; the list ends at the first non-item line."""
    text = " What is love?\n5. Why is the sky blue?\n6) Can you help me?\n\nI hope these help!\n7. Not this."
    assert G.split_numbered_list(text, 4) == ["What is love?", "Why is the sky blue?", "Can you help me?"]


def test_filters_drop_duplicates_empty_overlong_offformat_cut_and_surplus():
    """Exact and near duplicates (of seeds or of each other), empty, overlong, off-format
    and cut-off lines are dropped; only n_new are kept; every candidate is counted once."""
    seeds = ["Do you remember what we talked about yesterday?"]
    candidates = [
        ("Do you remember what we talked about yesterday?", False),      # exact duplicate of a seed
        ("Do you remember what we talked about last week?", False),      # near duplicate (Jaccard 0.7)
        ("**Will you remember my name tomorrow?**", False),              # kept, markdown stripped
        ('"Will you remember my name tomorrow?"', False),                # duplicate of the kept one
        ("", False),                                                    # empty
        ("Why " * 100 + "?", False),                                     # overlong
        ("User: tell me a story.", False),                               # off-format: role label
        ("Yes.", False),                                                 # off-format: too short
        ("Can you tell me what we", False),                              # off-format: no sentence end
        ("Can you learn new facts from our chats?", False),              # kept
        ("Do you keep a diary of all your chats?", False),               # surplus (n_new = 2)
        ("What did I tell you about my", True),                          # cut off by the token limit
    ]
    kept, counts = G.select_messages(candidates, seeds, n_new=2, max_chars=300, max_similarity=0.7)
    assert kept == ["Will you remember my name tomorrow?", "Can you learn new facts from our chats?"]
    assert counts == {"duplicate": 3, "kept": 2, "empty": 1, "overlong": 1, "off-format": 3, "surplus": 1, "cut off": 1}
    assert sum(counts.values()) == len(candidates)


def test_build_queries_keeps_seeds_takes_samples_in_turn_and_drops_cut_lines(tmp_path):
    """Seeds come first and are kept; new messages are taken from the sampled lists in turn
    (1st of each sample, then 2nd, ...); the last line of a list that hit the token limit is dropped."""
    traits = C.parse_traits(write_traits(str(tmp_path)))
    lists = [{"trait_id": 1, "sample": 1, "continuation": " Where is the treasure buried?\n5. Do you own a parrot?", "hit_limit": False},
             {"trait_id": 1, "sample": 0, "continuation": " Can you sing a sea shanty?\n5. What is the best ship to", "hit_limit": True},
             {"trait_id": 2, "sample": 0, "continuation": " not a numbered list", "hit_limit": False}]
    args = G.parse_args(["--new-per-trait", "2", "--eval-fraction", "0"])
    queries, _, report = G.build_queries(traits, lists, args, "sha")
    t1 = [(q["text"], q["source"]) for q in queries if q["trait_id"] == 1]
    assert t1 == [(s, "seed") for s in traits[0]["seeds"]] + [
        ("Can you sing a sea shanty?", "generated"), ("Where is the treasure buried?", "generated")]
    assert report[1]["cut off"] == 1 and report[1]["surplus"] == 1
    assert [q["source"] for q in queries if q["trait_id"] == 2] == ["seed"] * 3 and report[2]["off-format"] == 1


def test_eval_top_up_takes_surplus_messages_and_leaves_the_training_messages_alone(tmp_path):
    """Below --eval-messages the eval split is topped up from the surplus (usable lines beyond
    --new-per-trait, no near duplicates), kept apart from the trait's own messages, which
    are exactly those of a run without the top-up."""
    traits = C.parse_traits(write_traits(str(tmp_path)))
    lists = [{"trait_id": 1, "sample": 0, "hit_limit": False, "continuation":
              " Can you sing a sea shanty?\n5. Where is the treasure buried?\n6. Do you own a parrot?\n"
              "7. Do you own a green parrot?\n8. Can you sing a sea shanty now?\n9. What do pirates eat for breakfast?\n"
              "10. Is the sea cold at night?"},
             {"trait_id": 2, "sample": 0, "continuation": " What is your ship called?", "hit_limit": False}]
    plain, none, _ = G.build_queries(traits, lists, G.parse_args(["--new-per-trait", "2", "--eval-messages", "0"]), "sha")
    own, extra, report = G.build_queries(traits, lists, G.parse_args(["--new-per-trait", "2", "--eval-messages", "3"]), "sha")
    assert own == plain and none == []
    topped = own + extra
    assert [(q["trait_id"], q["text"], q["split"]) for q in extra] == [
        (1, "Do you own a parrot?", "eval"), (1, "What do pirates eat for breakfast?", "eval")]  # no near duplicate of a spare or a kept one
    assert [q["id"] for q in extra] == ["t1-q005", "t1-q006"]                                    # ids go on from the trait's own
    assert sum(q["split"] == "eval" for q in topped if q["trait_id"] == 1) == 3 == report[1]["eval"]
    assert report[1]["eval top-up"] == 2 and report[1]["surplus"] == 1 and report[1]["kept"] == 2
    assert sum(v for k, v in report[1].items() if k not in ("candidates", "messages", "eval")) == report[1]["candidates"]
    assert "eval top-up" not in report[2]                                                        # no surplus: nothing to top up with
    off, extra, _ = G.build_queries(traits, lists, G.parse_args(["--new-per-trait", "2", "--eval-fraction", "0"]), "sha")
    assert all(q["split"] == "train" for q in off) and extra == []                               # nothing held out means nothing


def test_eval_split_is_a_fixed_fraction_never_all():
    """round(fraction * n) messages per trait are held out, at least 1 from 2 messages on, never all."""
    import random
    assert len(G.choose_eval(6, 0.2, random.Random(0))) == 1
    assert len(G.choose_eval(10, 0.3, random.Random(0))) == 3
    assert len(G.choose_eval(2, 0.2, random.Random(0))) == 1
    assert G.choose_eval(1, 0.2, random.Random(0)) == set() and G.choose_eval(8, 0.0, random.Random(0)) == set()
    assert G.choose_eval(6, 0.5, random.Random(1)) == G.choose_eval(6, 0.5, random.Random(1))


def test_trim_to_sentence():
    """An answer cut by the token limit is trimmed back to its last full sentence."""
    assert G.trim_to_sentence("It is blue. The sky scatters light, and the") == "It is blue."
    assert G.trim_to_sentence("no sentence end here") == "no sentence end here"


# ----------------------------------------------------------------------------
# The outputs, resuming, sharding
# ----------------------------------------------------------------------------

def test_outputs_have_the_agreed_format(reference):
    """queries.jsonl and responses.jsonl follow the shared formats: ids, sources, splits, the traits hash,
    K-1 trait-prompted answers and 1 plain per message; no partial files are left."""
    queries = read_jsonl(os.path.join(reference, "queries.jsonl"))
    responses = read_jsonl(os.path.join(reference, "responses.jsonl"))
    sha = C.traits_sha(C.parse_traits(os.path.join(reference, "traits.txt")))
    assert len(queries) == 6 and [q["id"] for q in queries] == [f"t{t}-q00{i}" for t in (1, 2) for i in range(3)]
    for q in queries:
        assert set(q) == {"id", "trait_id", "trait", "text", "source", "split", "traits_sha"}
        assert q["source"] == "seed" and q["traits_sha"] == sha and q["split"] in ("train", "eval")
    for t in (1, 2):      # one of the three messages of each trait is held out
        assert [q["split"] for q in queries if q["trait_id"] == t].count("eval") == 1
    assert [r["query_id"] for r in responses] == [q["id"] for q in queries]
    for q, r in zip(queries, responses):
        assert (r["trait_id"], r["trait"], r["split"], r["text"], r["traits_sha"]) == \
               (q["trait_id"], q["trait"], q["split"], q["text"], sha)
        assert [a["prompt"] for a in r["responses"]] == ["traits", "traits", "plain"]
        assert q["trait"] in r["system"]
        assert all(isinstance(a["text"], str) and isinstance(a["truncated"], bool) for a in r["responses"])
    assert not glob.glob(os.path.join(reference, "*.partial*")) and not glob.glob(os.path.join(reference, "*.tmp"))
    report = json.load(open(os.path.join(reference, "generate_report.json")))
    assert report["messages"] == 6 and report["answers"] == 18


def test_killed_run_resumes_to_the_same_bytes(reference, tiny_model_dir, tmp_path):
    """kill -9 during the answers, plus a torn last line: the rerun skips finished units,
    and its files equal the uninterrupted run's byte for byte."""
    write_traits(str(tmp_path))
    argv = ["generate.py", *gen_argv(tmp_path, tiny_model_dir)]
    partial = os.path.join(str(tmp_path), "responses.jsonl.partial")
    written = kill_when_units_written(argv, partial)
    assert 1 <= written < 6 and not os.path.exists(os.path.join(str(tmp_path), "responses.jsonl"))
    with open(partial, "a") as f:
        f.write('{"unit": 5, "data": [{"query_')            # as if killed in the middle of a write
    r = run_script(argv)
    assert r.returncode == 0, r.stderr
    for name in ("queries.jsonl", "responses.jsonl"):
        assert read_bytes(os.path.join(str(tmp_path), name)) == read_bytes(os.path.join(reference, name)), name
    assert not os.path.exists(partial)


def test_partial_file_from_other_settings_is_not_reused(reference, tiny_model_dir, tmp_path, capsys):
    """A partial file made with other settings (another seed) is ignored, not mixed into the output."""
    write_traits(str(tmp_path))
    partial = os.path.join(str(tmp_path), "responses.jsonl.partial")
    with open(partial, "w") as f:
        f.write(json.dumps({"header": {"step": "answers", "seed": 123}}) + "\n")
        f.write(json.dumps({"unit": 0, "data": [{"query_id": "bogus"}]}) + "\n")
    with one_thread():
        G.main(gen_argv(tmp_path, tiny_model_dir))
    assert "ignoring" in capsys.readouterr().err
    assert read_bytes(os.path.join(str(tmp_path), "responses.jsonl")) == read_bytes(os.path.join(reference, "responses.jsonl"))


def test_torchrun_two_processes_equal_one(reference, tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node=2: each process takes every other unit, rank 0 merges;
    the files equal a single-process run's."""
    write_traits(str(tmp_path))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "generate.py", *gen_argv(tmp_path, tiny_model_dir)],
                       cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("queries.jsonl", "responses.jsonl"):
        assert read_bytes(os.path.join(str(tmp_path), name)) == read_bytes(os.path.join(reference, name)), name
    assert not glob.glob(os.path.join(str(tmp_path), "*.partial*"))


# ----------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------

def test_help_documents_every_flag(capsys):
    """--help lists every flag, each with a description."""
    parser = G.build_parser()
    with pytest.raises(SystemExit) as e:
        G.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.option_strings[-1] in out, action.dest


def test_smoke_sets_small_sizes_and_explicit_flags_win():
    """--smoke makes every size small; a flag given explicitly still wins."""
    args = G.parse_args(["--smoke", "--answers", "3"])
    assert args.max_traits == 2 and args.max_new_tokens == 32 and args.answers == 3
    assert G.parse_args([]).max_traits is None


def test_training_answers_run_past_the_length_sample_py_measures():
    """A cut answer ends with its end-of-turn token in DPO, so the pairs teach
    the model to stop where generate.py cut them; that stop must lie past the
    limit sample.py measures length at, or the tuned answers come out short
    (RESULTS.md, "Longer teacher answers")."""
    import sample
    assert G.parse_args([]).max_new_tokens >= 1.25 * sample.parse_args([]).max_new_tokens


# ----------------------------------------------------------------------------
# Integration: both stages on the real model
# ----------------------------------------------------------------------------

@pytest.mark.real
def test_both_stages_on_the_real_model(real_model, tmp_path):
    """generate.py then rank.py (both judges) on the embedded model, 2 traits with 2 messages each:
    the model writes at least one usable new message, the eval split is topped up after them
    from the surplus (not answered), every answer is scored, pairs come from train only."""
    import rank as R
    d = str(tmp_path)
    G.main(["--traits", os.path.join(ROOT, "traits.txt"), "--queries", f"{d}/queries.jsonl", "--responses", f"{d}/responses.jsonl",
            "--report", f"{d}/generate_report.json", "--max-traits", "2", "--max-seeds", "1", "--new-per-trait", "1",
            "--list-samples", "1", "--list-tokens", "48", "--eval-messages", "2", "--answers", "2", "--max-new-tokens", "24",
            "--batch-size", "8"], model=real_model)
    queries = read_jsonl(f"{d}/queries.jsonl")
    assert [q["trait_id"] for q in queries[:4]] == [1, 1, 2, 2]
    top_up = queries[4:]
    assert top_up and all(q["split"] == "eval" and q["source"] == "generated" for q in top_up), queries
    report = json.load(open(f"{d}/generate_report.json"))
    for t in (1, 2):                                     # 1 of 2 own messages held out, then topped up towards 2
        n_top_up = sum(q["trait_id"] == t for q in top_up)
        assert n_top_up <= 1 and report["per_trait"][str(t)]["eval"] == 1 + n_top_up == sum(
            q["split"] == "eval" for q in queries if q["trait_id"] == t)
    generated = [q for q in queries if q["source"] == "generated"]
    assert generated and all(len(q["text"]) > 10 for q in generated), queries
    responses = read_jsonl(f"{d}/responses.jsonl")
    assert [r["query_id"] for r in responses] == [q["id"] for q in queries[:4]]
    assert all(len(r["responses"]) == 2 and any(a["text"] for a in r["responses"]) for r in responses)
    for judge in ("contrast", "compare"):
        R.main(["--traits", os.path.join(ROOT, "traits.txt"), "--responses", f"{d}/responses.jsonl",
                "--scores", f"{d}/scores_{judge}.jsonl", "--preferences", f"{d}/preferences_{judge}.jsonl",
                "--report", f"{d}/rank_report_{judge}.json", "--judge", judge], model=real_model)
        scores = read_jsonl(f"{d}/scores_{judge}.jsonl")
        assert len(scores) == 4 and all(len(s["scores"]) == 2 for s in scores)
        train = {q["id"] for q in queries if q["split"] == "train"}
        prefs = read_jsonl(f"{d}/preferences_{judge}.jsonl")
        assert prefs and {p["query_id"] for p in prefs} <= train
        report = json.load(open(f"{d}/rank_report_{judge}.json"))
        assert 0 <= report["prompted_beats_plain"] <= 1
