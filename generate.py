"""Stages 1 and 2: traits -> user messages -> several answers to each.

The character is a list of traits in the first person (`traits.txt`), each
with a few seed user messages. This stage makes the data that the rest of the
pipeline learns from.

Reads:  traits.txt (its format: character.py).
Writes: data/queries.jsonl    one user message per line, each trait's in turn, then the eval top-up:
          {"id": "t1-q007", "trait_id": 1, "trait", "text", "source": "seed"|"generated",
           "split": "train"|"eval", "traits_sha"}
        data/responses.jsonl  one message per line (all but the eval top-up), with its K answers:
          {"query_id", "trait_id", "trait", "split", "text", "system",
           "responses": [{"text", "prompt": "traits"|"plain", "truncated", "n_tokens"}, ...],
           "traits_sha"}
        data/generate_report.json   what the filters dropped, timings.

`traits_sha` (character.py) ties every record to the traits file it came
from, so a later stage can refuse data made from another one.

It works in two steps:

1. Messages. For each trait the model writes new user messages that would
   bring the trait out. A small model asked to "write a question that tests
   trait X" writes poor questions; so instead the request is answered *for*
   it: its own answer (the assistant turn) is prefilled with the seed messages
   as the start of a numbered list, and the model continues the list:

       user:      Write a numbered list of 10 different messages that a user
                  might send to an AI assistant. Each message should give the
                  assistant a chance to show this trait: "<trait>"
       assistant: Here are 10 such messages:
                  1. <seed 1>
                  2. <seed 2>
                  3.                                  <- the model goes on here

   The new lines are cleaned and filtered: empty, overlong and off-format
   lines are dropped, and so are exact and near duplicates of the seeds or of
   each other (near: Jaccard similarity of their word sets, |A n B| / |A u B|,
   at least --max-similarity). The seeds are kept as messages too. A fixed
   share of each trait's messages (--eval-fraction) is held out as the "eval"
   split: no training stage uses it; sample.py measures on it. 20% of the
   pirate's ~105 messages a trait is 21, and sample.py's figures need 30
   (x 3 seeds = 90 answers a cell), so the split is topped up to
   --eval-messages from the surplus: usable lines the lists wrote beyond
   --new-per-trait (the assistant's 7 traits, ~33 messages each, have less
   surplus than they need; the summary says so). The top-up
   goes at the end of the file, after every trait's own messages, and is
   not answered here (eval answers serve only rank.py's sanity figures), so
   every other message, answer and pair is exactly that of a run without it.

2. Answers. Each message (but the eval top-up) is answered K times (--answers), sampled: K-1
   times with the trait's teacher prompt as the system prompt (its role and
   the trait line, "You are a pirate. I talk like an old sea pirate, ...":
   `character.teacher_prompt`) and once with the model's plain default
   system prompt. The teacher prompt sets the ceiling of the whole method:
   the pairs can only be as in character as these answers (RESULTS.md,
   "The teacher's ceiling"). The plain answer is the baseline that rank.py's
   sanity figure compares against, and for traits the prompt barely moves
   (the AI identity at 135M) the K answers are a best-of-K to choose from.

   The answers are sampled as sample.py samples the models it measures: no
   repetition penalty (--repetition-penalty 1). Some teacher answers then
   loop ("Aye, aye, aye, aye..."), and rank.py makes those the rejected
   answers, so DPO learns to stop a loop. With a penalty of 1.1 no answer in
   the data looped, DPO never saw one, and the tuned pirate of pipeline seed
   1 looped in 10.6% of its answers (RESULTS.md, "Loops").

   The answers are longer (--max-new-tokens 96) than those sample.py
   measures (64). Most answers hit the limit and are cut back to their last
   sentence, and DPO scores that cut answer with its end-of-turn token, so
   every pair also teaches "stop here". At 64 tokens the pairs taught the
   tuned model to stop after about 50, and every recipe strong enough to
   give the character shortened its answers past the length limit or, held
   gentler, looped (RESULTS.md, "Longer teacher answers"). At 96 the
   stop it learns lies past the measure's limit.

Resuming. The work is cut into units (fixed batches in a fixed order, each
sampled with a seed made from --seed and the unit's index), so the result
does not depend on when or where a unit ran; a rerun after a crash or
`kill -9` skips the finished units and ends with the same files as an
uninterrupted run. Several processes: `torchrun --nproc_per_node=N
generate.py ...` gives unit i to process i % N. How (partial files, atomic
writes): stage_files.py, which rank.py uses too.

Run it:
    python generate.py                    # the default character: 200 new messages, ~5 minutes on 2 CPU cores
    python generate.py --smoke            # 2 traits, 3 messages each, short answers (CI)
    python generate.py --traits personas/pirate.txt --messages 40       # a quick try of another character

What it simplifies: the teacher is the model itself with a role prompt (a
larger teacher model would raise the ceiling); near duplicates are found by
word overlap, not by meaning.
Read next: rank.py.
"""
import argparse
import hashlib
import json
import math
import random
import re
import sys
import time

import model as M
from character import InputError, parse_traits, teacher_prompt, traits_sha
from stage_files import (barrier, finish_distributed, init_distributed, remove_partials, run_units, unit_seed, write_atomic,
                         write_jsonl_atomic)

PROG = "generate.py"

# --smoke: the smallest run that still goes through every step (CI, a first try).
SMOKE = dict(max_traits=2, max_seeds=2, new_per_trait=1, list_samples=1, list_tokens=48,
             eval_messages=0, answers=4, max_new_tokens=32)


def build_parser():
    p = M.ArgumentParser(
        prog=PROG, description="Stages 1+2: write user messages for each trait, then K answers to each.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--traits", default="traits.txt", help="the character: traits with seed messages")
    p.add_argument("--queries", default="data/queries.jsonl", help="output: the user messages")
    p.add_argument("--responses", default="data/responses.jsonl", help="output: K answers per message")
    p.add_argument("--report", default="data/generate_report.json", help="output: filter counts and timings")
    # messages
    p.add_argument("--max-traits", type=M.number(int, at_least=1), default=None, help="use only the first N traits (None: all)")
    p.add_argument("--max-seeds", type=M.number(int, at_least=0), default=None,
                   help="keep at most N seed messages per trait as messages (all seeds still prime the list; None: all)")
    p.add_argument("--messages", type=M.number(int, at_least=0), default=200,
                   help="new messages in all, shared out evenly over the traits (the pipeline's time grows with it)")
    p.add_argument("--new-per-trait", type=M.number(int, at_least=0), default=None,
                   help="new messages the model writes per trait (None: --messages / number of traits)")
    p.add_argument("--list-samples", type=M.number(int, at_least=1), default=None,
                   help="sampled continuations of each trait's list; more gives more candidates to filter "
                        "(None: 0.3 x new per trait, at least 2: a list gives about 8 candidates, of which 3-5 survive "
                        "the filters; the surplus is in data/generate_report.json)"),
    p.add_argument("--list-tokens", type=M.number(int, at_least=1), default=96, help="new tokens per list continuation")
    p.add_argument("--max-message-chars", type=M.number(int, at_least=1), default=300, help="longer messages are dropped")
    p.add_argument("--max-similarity", type=M.number(float, above=0, at_most=1), default=0.7,
                   help="a message whose word-set Jaccard similarity to a kept one is at least this is a near duplicate")
    p.add_argument("--eval-fraction", type=M.number(float, at_least=0, below=1), default=0.2,
                   help="share of each trait's messages held out as the eval split (at least 1 when a trait has 2 or more)")
    p.add_argument("--eval-messages", type=M.number(int, at_least=0), default=30,
                   help="held-out messages per trait at least: where --eval-fraction gives fewer, the split is topped up "
                        "from the surplus (messages the filters passed beyond --new-per-trait), so the training messages "
                        "stay the same; 30 x sample.py's 3 seeds = 90 answers a cell (0, or --eval-fraction 0: no top-up)")
    # answers
    p.add_argument("--answers", type=M.number(int, at_least=2), default=4, help="K answers per message: K-1 with the trait, 1 plain")
    p.add_argument("--max-new-tokens", type=M.number(int, at_least=1), default=96,
                   help="answer length limit in tokens; longer than sample.py's 64, so that the stop DPO learns lies past it")
    p.add_argument("--temperature", type=M.number(float, at_least=0), default=0.7, help="answer sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=M.number(float, above=0, at_most=1), default=0.9, help="nucleus sampling: keep the most likely tokens up to this probability")
    p.add_argument("--repetition-penalty", type=M.number(float, above=0), default=1.0,
                   help="divide the logits of tokens already in the sequence by this (1 = off: the data shows the loops DPO must learn to avoid)")
    p.add_argument("--batch-size", type=M.number(int, at_least=1), default=64, help="sequences generated together")
    p.add_argument("--seed", type=M.number(int, at_least=0), default=0, help="same seed, same files (each unit of work is seeded from it)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny sizes for a quick end-to-end run ({', '.join(f'{k}={v}' for k, v in SMOKE.items())}); other flags still override")
    M.add_model_args(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:                      # smoke sizes become the defaults; explicit flags still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    return args


# ----------------------------------------------------------------------------
# Stage 1: new user messages, by continuing a numbered list
# ----------------------------------------------------------------------------

def list_prompt(tok, trait_text, seeds, total):
    """Prompt ids ending inside the model's own (prefilled) numbered list, right after "N+1."."""
    user = (f"Write a numbered list of {total} different messages that a user might send to an AI assistant. "
            f'Each message should give the assistant a chance to show this trait: "{trait_text}"')
    prefill = f"Here are {total} such messages:\n" + "".join(f"{i}. {s}\n" for i, s in enumerate(seeds, 1))
    prefill += f"{len(seeds) + 1}."
    ids, _ = tok.chat([{"role": "user", "content": user}], add_generation_prompt=True)
    return ids + tok.encode(prefill)


def split_numbered_list(continuation, first_number):
    """The items of a list continuation that starts right after "<first_number>.".
    The list ends at the first line that is not "<n>. text"."""
    items = []
    for line in f"{first_number}.{continuation}".split("\n"):
        m = re.match(r"\s*\d+\s*[.)]\s*(.*)$", line)
        if not m:
            break
        items.append(m.group(1))
    return items


def clean_message(text):
    """Strip markdown emphasis and quotes the model likes to wrap messages in."""
    text = text.strip().strip("*").strip()
    if len(text) >= 2 and text[0] in "\"'“" and text[-1] in "\"'”":
        text = text[1:-1].strip()
    return text


def words(text):
    return set(re.findall(r"\w+", text.lower()))


def jaccard(a, b):
    return len(a & b) / max(len(a | b), 1)


def why_dropped(text, max_chars):
    """None for a usable message, else the reason it is dropped."""
    if not text:
        return "empty"
    if len(text) > max_chars:
        return "overlong"
    if ("<|" in text or re.match(r"(user|assistant|ai|system|message|answer)\s*\d*\s*:", text, re.I)
            or len(re.findall(r"[^\W\d_]+", text)) < 3            # fewer than three words
            or not re.search(r"[?.!\"')”]$", text)):               # no sentence end: cut off or not a message
        return "off-format"
    return None


def select_messages(candidates, seeds, n_new, max_chars, max_similarity):
    """Walk the candidates in order and keep the first n_new usable ones.
    Returns (kept, counts of every outcome)."""
    kept, counts = [], {}
    seen = [words(s) for s in seeds]
    for raw, cut_off in candidates:
        text = clean_message(raw)
        reason = "cut off" if cut_off else why_dropped(text, max_chars)
        if reason is None:
            w = words(text)
            if any(jaccard(w, s) >= max_similarity for s in seen):
                reason = "duplicate"
            elif len(kept) >= n_new:
                reason = "surplus"
        counts[reason or "kept"] = counts.get(reason or "kept", 0) + 1
        if reason is None:
            kept.append(text)
            seen.append(words(text))
    return kept, counts


def choose_eval(n, fraction, rng):
    """Indices of the eval messages among n: round(fraction * n), at least one
    when there are two or more messages, and never all of them."""
    if fraction <= 0 or n < 2:
        return set()
    k = min(max(1, round(fraction * n)), n - 1)
    return set(rng.sample(range(n), k))


def build_queries(traits, lists, args, sha):
    """Turn the list continuations into the final message records (deterministic):
    (each trait's messages, the eval top-up, a report per trait)."""
    queries, top_ups, report = [], [], {}
    for t in traits:
        per_sample = []
        for item in sorted((x for x in lists if x["trait_id"] == t["id"]), key=lambda x: x["sample"]):
            items = split_numbered_list(item["continuation"], len(t["seeds"]) + 1)
            # The last item of a continuation that ran out of tokens may be cut mid-sentence.
            per_sample.append([(raw, item["hit_limit"] and j == len(items) - 1) for j, raw in enumerate(items)])
        # Take the samples' items in turn (1st of each, then 2nd of each, ...): the first
        # lines of a continuation stay closest to the seeds, and each sample saw another seed order.
        candidates = [s[j] for j in range(max(map(len, per_sample), default=0)) for s in per_sample if j < len(s)]
        # Selection is in order, so the first new_per_trait of a longer selection are
        # exactly the messages a selection of new_per_trait keeps; the rest are spare.
        chosen, counts = select_messages(candidates, t["seeds"], args.new_per_trait + args.eval_messages,
                                         args.max_message_chars, args.max_similarity)
        new, spare = chosen[:args.new_per_trait], chosen[args.new_per_trait:]
        seeds = t["seeds"][:args.max_seeds] if args.max_seeds is not None else t["seeds"]
        texts = [(s, "seed") for s in seeds] + [(s, "generated") for s in new]
        eval_idx = choose_eval(len(texts), args.eval_fraction, random.Random(unit_seed(args.seed, "split", t["id"])))
        for i, (text, source) in enumerate(texts):
            queries.append({"id": f"t{t['id']}-q{i:03d}", "trait_id": t["id"], "trait": t["text"], "text": text,
                            "source": source, "split": "eval" if i in eval_idx else "train", "traits_sha": sha})
        # The eval top-up: enough spare messages to hold out --eval-messages in all.
        # They are not near duplicates of any message kept (select_messages checked).
        top_up = spare[:max(0, args.eval_messages - len(eval_idx))] if args.eval_fraction > 0 else []
        top_ups += [{"id": f"t{t['id']}-q{len(texts) + j:03d}", "trait_id": t["id"], "trait": t["text"], "text": text,
                     "source": "generated", "split": "eval", "traits_sha": sha} for j, text in enumerate(top_up)]
        counts = {k: v for k, v in {**counts, "kept": len(new), "eval top-up": len(top_up),
                                    "surplus": counts.get("surplus", 0) + len(spare) - len(top_up)}.items() if v}
        report[t["id"]] = {"candidates": len(candidates), **counts, "messages": len(texts) + len(top_up),
                           "eval": len(eval_idx) + len(top_up)}
    return queries, top_ups, report


# ----------------------------------------------------------------------------
# Stage 2: K answers per message
# ----------------------------------------------------------------------------

def trim_to_sentence(text):
    """Cut an answer that hit the token limit back to its last complete sentence,
    so that no later stage learns to stop mid-word. Unchanged if there is none."""
    ends = [m.end() for m in re.finditer(r"[.!?][\"')\]]*(?=\s|$)", text)]
    return text[:ends[-1]] if ends else text


def answer_prompts(tok, query, trait, k):
    """The K prompts for one message: K-1 with the trait's teacher prompt as the
    system prompt, 1 with the model's plain default one."""
    system = teacher_prompt(trait)
    return system, [(tok.prompt(query["text"], system), "traits")] * (k - 1) + [(tok.prompt(query["text"]), "plain")]


# ----------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------

def run(args, model=None):
    """Stages 1+2 with parsed arguments. `model`: an already loaded model (tests), else loaded from args."""
    t_start = time.time()
    traits = parse_traits(args.traits)
    sha = traits_sha(traits)                     # of the whole file: --max-traits only limits the work
    traits = traits[:args.max_traits] if args.max_traits else traits
    if args.new_per_trait is None:
        args.new_per_trait = math.ceil(args.messages / len(traits))
    if args.list_samples is None:
        args.list_samples = max(2, math.ceil(0.3 * args.new_per_trait))
    device = M.pick_device(args.device) if model is None else model.embed_tokens.weight.device
    rank, world, device = init_distributed(device)
    if model is None:
        model = M.load_model(args.model, device, args.dtype, "decoding")
    tok = model.tokenizer
    common = {"model": args.model or "embedded", "device": device.type, "dtype": str(model.embed_tokens.weight.dtype),
              "seed": args.seed, "traits_sha": sha}

    # --- stage 1: list continuations, in units of batch_size prompts ----------
    jobs = []                                    # (trait, sample index, seed order)
    for t in traits:
        for s in range(args.list_samples):
            seeds = list(t["seeds"])
            if s > 0:                            # a different order of the seeds gives a different list
                random.Random(unit_seed(args.seed, "order", f"{t['id']}/{s}")).shuffle(seeds)
            jobs.append((t, s, seeds))
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    # "\n\n" ends the list: stop there too, not only at the end of the turn.
    blank_line = tok.encode("\n\n")
    list_stops = tok.stop_ids + (blank_line if len(blank_line) == 1 else [])

    def do_list_unit(i):
        # Ask for a list a little longer than needed: the filters drop some lines.
        prompts = [list_prompt(tok, t["text"], seeds, max(10, len(seeds) + 2 * args.new_per_trait))
                   for t, _, seeds in batches[i]]
        outs = M.generate(model, prompts, args.list_tokens, temperature=0.8, top_p=0.95, seed=unit_seed(args.seed, "lists", i),
                          stop_ids=list_stops)
        return [{"trait_id": t["id"], "sample": s, "continuation": tok.decode(o), "hit_limit": len(o) >= args.list_tokens}
                for (t, s, _), o in zip(batches[i], outs)]

    header = {"step": "lists", **common, "traits": [t["id"] for t in traits], "batch_size": args.batch_size,
              "list_samples": args.list_samples, "list_tokens": args.list_tokens, "new_per_trait": args.new_per_trait}
    lists = [x for unit in run_units(len(batches), do_list_unit, args.queries, header, rank, world, "messages") for x in unit]
    queries, top_up, list_report = build_queries(traits, lists, args, sha)
    if rank == 0:                                # the top-up last: it is asked by sample.py, never answered here
        write_jsonl_atomic(args.queries, queries + top_up)
    t_lists = time.time() - t_start

    # --- stage 2: K answers per message, in units of whole messages ------------
    by_id = {t["id"]: t for t in traits}
    per_unit = max(1, args.batch_size // args.answers)
    units = [queries[i:i + per_unit] for i in range(0, len(queries), per_unit)]

    def do_answer_unit(i):
        prompts, systems = [], []
        for q in units[i]:
            system, qp = answer_prompts(tok, q, by_id[q["trait_id"]], args.answers)
            systems.append(system)
            prompts.extend(qp)
        outs = M.generate(model, [p for p, _ in prompts], args.max_new_tokens, args.temperature, args.top_p,
                          args.repetition_penalty, seed=unit_seed(args.seed, "answers", i))
        records = []
        for j, (q, system) in enumerate(zip(units[i], systems)):
            answers = []
            for (_, kind), o in zip(prompts[j * args.answers:(j + 1) * args.answers], outs[j * args.answers:(j + 1) * args.answers]):
                truncated = len(o) >= args.max_new_tokens
                text = tok.decode(o).strip()
                answers.append({"text": trim_to_sentence(text) if truncated else text, "prompt": kind,
                                "truncated": truncated, "n_tokens": len(o)})
            records.append({"query_id": q["id"], "trait_id": q["trait_id"], "trait": q["trait"], "split": q["split"],
                            "text": q["text"], "system": system, "responses": answers, "traits_sha": sha})
        return records

    queries_sha = hashlib.sha256(json.dumps(queries, ensure_ascii=False).encode()).hexdigest()
    header = {"step": "answers", **common, "queries_sha": queries_sha, "answers": args.answers,
              "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}
    responses = [r for unit in run_units(len(units), do_answer_unit, args.responses, header, rank, world, "answers") for r in unit]
    barrier(world)                               # every process has merged; partial files may go
    if rank != 0:
        return None
    write_jsonl_atomic(args.responses, responses)
    all_answers = [a for r in responses for a in r["responses"]]
    report = {"traits_sha": sha, "messages": len(queries) + len(top_up), "answered_messages": len(queries),
              "eval_messages": sum(q["split"] == "eval" for q in queries + top_up), "eval_top_up": len(top_up),
              "answers": len(all_answers), "truncated_share": round(sum(a["truncated"] for a in all_answers) / len(all_answers), 3),
              "per_trait": {str(k): v for k, v in list_report.items()},
              "seconds_messages": round(t_lists, 1), "seconds_total": round(time.time() - t_start, 1)}
    write_atomic(args.report, json.dumps(report, indent=2) + "\n")
    remove_partials(args.queries)
    remove_partials(args.responses)
    print_summary(traits, list_report, report, args)
    return report


def print_summary(traits, list_report, report, args):
    print(f"\n{'trait':>5}  {'candidates':>10}  {'kept':>4}  {'dropped (reason: count)':<40}  messages  eval")
    for t in traits:
        r = list_report[t["id"]]
        dropped = ", ".join(f"{k}: {v}" for k, v in r.items() if k not in ("candidates", "kept", "eval top-up", "messages", "eval"))
        top_up = f" ({r['eval top-up']} topped up)" if r.get("eval top-up") else ""
        print(f"{t['id']:>5}  {r['candidates']:>10}  {r.get('kept', 0):>4}  {dropped or '-':<40}  {r['messages']:>8}  {r['eval']:>4}{top_up}")
        if 0 < args.eval_fraction and r["eval"] < args.eval_messages:
            print(f"{PROG}: note: trait {t['id']} holds out {r['eval']} messages, fewer than --eval-messages "
                  f"{args.eval_messages} (too little surplus: more --list-samples would give more, "
                  f"and change the training messages too)", file=sys.stderr)
    print(f"{report['messages']} messages ({report['eval_messages']} eval, {report['eval_top_up']} of them the top-up, not answered), "
          f"{report['answers']} answers "
          f"({100 * report['truncated_share']:.0f}% hit --max-new-tokens and were trimmed to a sentence), "
          f"{report['seconds_total']:.0f} s")
    print(f"wrote {args.queries}, {args.responses}, {args.report}")


def main(argv=None, model=None):
    args = parse_args(argv)
    try:
        return run(args, model)
    except (InputError, M.ModelError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        finish_distributed()


if __name__ == "__main__":
    main()
