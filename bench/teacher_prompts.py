"""How in character is the base model under each teacher prompt? The ceiling
of character training: the answers the pipeline learns from are only as in
character as the prompt that makes them.

    python bench/teacher_prompts.py --traits personas/pirate.txt
    python bench/teacher_prompts.py --traits traits.txt --queries data/queries.jsonl
    python bench/teacher_prompts.py --traits personas/pirate.txt --role "You are an old sea pirate."

For every trait with a `check:` pattern, the base model answers the everyday
requests of sample.py (and the trait's held-out messages, with --queries,
else its seed messages) under each system prompt, several sampling seeds
each, and the share of answers that pass the trait's check is printed as a
markdown table (mean ± standard deviation over seeds), with the share of
answers that loop. System prompts compared:

    plain          the model's own default (no character)
    wrapper        what generate.py used before 2026-12-03: the default message,
                   then "This is your character, in your own words: - <trait>
                   Answer in a way that shows this character."
    trait line     the trait alone, in the first person
    teacher        the file's teacher prompt: its role + the trait line (character.py)
    --role X       X + the trait line, for each X given
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fast  # noqa: E402
import model as M  # noqa: E402
from character import loops, parse_traits, shows, teacher_prompt  # noqa: E402
from sample import GENERAL_PROMPTS  # noqa: E402


def wrapper_prompt(trait, default_system):
    """The teacher prompt generate.py used until 2026-12-03."""
    base = default_system.strip()
    return (base + ("" if base.endswith((".", "!", "?")) else ".") + "\n\nThis is your character, in your own words:\n"
            f"- {trait['text']}\nAnswer in a way that shows this character.")


def build_parser():
    p = M.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traits", default="traits.txt")
    p.add_argument("--queries", default=None, help="take each trait's held-out messages from this file (generate.py's)")
    p.add_argument("--role", nargs="*", default=[], help="more roles to try (each followed by the trait line)")
    p.add_argument("--seeds", type=M.number(int, at_least=0), nargs="+", default=[0, 1, 2])
    p.add_argument("--general", type=M.number(int, at_least=0), default=len(GENERAL_PROMPTS))
    p.add_argument("--max-new-tokens", type=M.number(int, at_least=1), default=64)
    p.add_argument("--batch-size", type=M.number(int, at_least=1), default=96)
    M.add_model_args(p)
    return p


def main():
    args = build_parser().parse_args()
    traits = [t for t in parse_traits(args.traits) if t.get("check")]
    device = M.pick_device(args.device)
    model = M.load_model(args.model, device, args.dtype, "decoding")
    tok = model.tokenizer
    own = {t["id"]: list(t["seeds"]) for t in traits}
    if args.queries:                 # the held-out messages of each trait, matched by the trait's text (any role)
        own = {t["id"]: [] for t in traits}
        by_text = {t["text"]: t["id"] for t in traits}
        with open(args.queries) as f:
            for q in map(json.loads, f):
                if q["split"] == "eval" and q["trait"] in by_text:
                    own[by_text[q["trait"]]].append(q["text"])
    general = GENERAL_PROMPTS[:args.general]
    variants = {"plain": lambda t: None, "wrapper": lambda t: wrapper_prompt(t, tok.default_system),
                "trait line": lambda t: t["text"], "teacher": teacher_prompt}
    variants.update({f"role: {r}": (lambda t, r=r: f"{r} {t['text']}") for r in args.role})
    print(f"CPU: {fast.cpu_kind()}; {args.traits}; {len(general)} everyday requests, "
          f"{'held-out messages from ' + args.queries if args.queries else 'seed messages'}; seeds {args.seeds}", file=sys.stderr)
    jobs, seen = [], {}                                      # one prompt per (system, message); plain shared by all traits
    for t in traits:
        for name, make in variants.items():
            system = make(t)
            for group, msgs in (("own", own[t["id"]]), ("general", general)):
                for text in msgs:
                    jobs.append((t["id"], name, group, system, text))
                    seen.setdefault((system, text), None)
    prompts = list(seen)
    answers = {}
    for seed in args.seeds:
        ids = [tok.prompt(text, system) for system, text in prompts]
        outs = []
        for b in range(0, len(ids), args.batch_size):
            outs += M.generate(model, ids[b:b + args.batch_size], args.max_new_tokens, temperature=0.7, top_p=0.9,
                               seed=1000 * seed + b)
        for key, o in zip(prompts, outs):
            answers[key + (seed,)] = (tok.decode(o), loops(o))
    print(f"\nCPU: {fast.cpu_kind()}\n")
    print("| trait | system prompt | own messages | everyday requests | loops (all) |\n|---|---|---:|---:|---:|")
    by_id = {t["id"]: t for t in traits}
    for t in traits:
        for name in variants:
            cells = []
            for group in ("own", "general"):
                per_seed = []
                for seed in args.seeds:
                    hits = [shows(by_id[t["id"]], answers[(s, x, seed)][0]) for tid, n, g, s, x in jobs
                            if tid == t["id"] and n == name and g == group]
                    per_seed.append(sum(hits) / max(len(hits), 1))
                cells.append(f"{100 * statistics.fmean(per_seed):.0f}% ± {100 * statistics.stdev(per_seed):.0f}")
            looped = [answers[(s, x, seed)][1] for tid, n, g, s, x in jobs if tid == t["id"] and n == name
                      for seed in args.seeds]
            print(f"| {t['text'][:50]} | {name} | {cells[0]} | {cells[1]} | {100 * sum(looped) / len(looped):.0f}% |")


if __name__ == "__main__":
    main()
