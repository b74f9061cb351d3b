"""Stage 3: the model ranks its own answers -> preference pairs.

generate.py answered every user message K times: K-1 times with the
message's trait in the system prompt, once with the plain default prompt.
Here the same model scores every answer by how well it shows the trait, and
the best and worst answer of each message become a preference pair
(chosen, rejected) for the reward model and DPO. No human labels anywhere.

Reads:  traits.txt, data/responses.jsonl (from generate.py, same traits file).
Writes: data/scores.jsonl       every answer's score, one message per line
        data/preferences.jsonl  one pair per line, train split only:
          {"id": "t1-q007-2-0", "query_id", "trait", "prompt": [{"role": "user", ...}],
           "chosen": [{"role": "assistant", ...}], "rejected": [...], "score_chosen",
           "score_rejected", "margin", "rejected_breaks_character", "rejected_loops", "drop_instruction",
           "judge", "traits_sha"}
          (no system message in the prompt: DPO trains the model to show the
          character with its plain default system prompt)
        data/rank_report.json   the sanity figures and one ranked example.

Two judges (--judge):

  contrast (default): how much more likely the answer is when the model has
      the trait's teacher prompt as its system prompt (`character.teacher_prompt`,
      the one generate.py answered with) than when it has the plain prompt,
      averaged over the answer's tokens a_1..a_T:

          score = 1/T sum_t [ log p(a_t | teacher prompt, message, a_<t)
                            - log p(a_t | plain prompt,   message, a_<t) ]

      A log-likelihood ratio: positive when the answer is "more in character
      than usual". It needs no instruction following, so it works at any
      scale. The mean favours a short answer with one in-character turn of
      phrase; with --score sum (the sum over a_1..a_T, no 1/T) a longer
      answer that stays in character scores more (RESULTS.md, "Keeping the
      best of 8 from shortening the answers"). With --against opposite the
      second prompt holds the *opposite* trait instead of the plain one (as
      in RLCD, Yang et al. 2023): the ratio then measures "in character
      rather than out of character". The
      opposite traits are written by hand in the traits file, one
      "opposite: ..." line per trait (see traits.txt).

  compare: the Constitutional AI way. The model sees the trait, the message
      and two answers as (A) and (B), and its own answer is prefilled up to
      "The answer that shows the trait better is (". The judgement is read
      from the next-token probabilities:

          P(A better) = p("A") / (p("A") + p("B"))

      Language models prefer one position whatever the content, so every
      pair is shown in both orders and the two readings are averaged:

          P(i better than j) = 1/2 [ P(A | i, j) + 1 - P(A | j, i) ]

      An answer's score is its mean win probability against the other K-1.
      The share of pairs whose verdict flips when the order flips measures
      how much of the judgement was position, not content.

Sanity figures (printed and saved): every message has one plain answer among
its candidates. A judge that sees the trait should rank the trait-prompted
answers above it: "prompted beats plain" is the share of (trait-prompted,
plain) answer pairs of the same message where the trait-prompted one scores
higher (ties count one half; 0.5 is chance), per trait and overall. The same
figure pooled over all messages is the area under the ROC curve (AUC) of the
score for telling trait-prompted from plain answers. These measure the judge
and the prompting together: where the system prompt barely changed the
answers (identity traits on a 135M model), no judge can separate them.

Read the contrast judge's figure with care: it has a head start built in.
Each answer was sampled from one of the two prompts that contrast compares,
so its expected score is a KL divergence: KL(p_traits || p_plain) >= 0 for
a trait-prompted answer, -KL(p_plain || p_traits) <= 0 for the plain one.
Even a random network scores near 1.0 here (see the tiny-model tests). The
figure shows how far the prompt moved the answers and that the judge points
the right way, not that it reads the trait; compare has no such head start,
and neither has --against opposite as much (no answer was sampled from the
opposite prompt). What the judge really sees is measured through each
trait's `check:` pattern, which the judge never reads: the share of all,
chosen and rejected answers that pass it, the AUC of the score for
telling passing from failing answers, and the most any judge could choose
(the share of messages with a passing answer that may be chosen); printed,
and in the report under "judge_seen_through_the_checks". A chosen rate near
that best means the judge did its part: only more teacher answers raise it
(`generate.py --answers 9`, the best of 8; it also shortens the answers
DPO learns: RESULTS.md, "Best of 8").

Which answers may be chosen. An answer that matches any trait's `never:`
pattern (it claims a body, a home, a memory: a bad example for every
trait), one that declines to help or to give a view ("I'm not equipped to
provide opinions": the assistant's traits once took by learning just that),
one that loops (a token 3-gram 4 times or more) and an empty one are never
chosen. An answer that breaks the character is taken as the rejected one
where a message has one, whatever its score: it is the clearest example of
what the character is not. Failing that, an answer that loops is: DPO then
also learns to stop a loop (generate.py samples without a repetition
penalty, so the teacher's loops show up in the data). A declining answer is
only kept from being chosen; it is rejected when the judge scores it worst.
With --min-length s (off by default), an answer with fewer words than s
times the plain answer to the same message is not chosen either: the
judge's mean per token favours short answers, and DPO learns from them to
stop early (the knight's best of 8: RESULTS.md, "Keeping the best of 8 from
shortening the answers").

No answer that repeats itself (--max-repeats r; off by default). An answer
in which more than a share r of its own word 3-grams were said before in it
is not chosen (sample.py's "repeats" is the mean of this share): short of a
loop, but a tic that SFT on the chosen answers copies ("I'm a Southern
cowboy, and I'm not about fine-tuned dishes." twice in one answer; the
Makefile's SFT=1 MAX_REPEATS=0.1, RESULTS.md, "SFT first").

No stock opening line (--opening-cap c; off by default). The judge can rate
one opening as strongly the teacher's: the wizard's best of 8 chose "A wise
question, my friend." for 28 of 165 pairs, and the tuned wizard began 40% of
its answers with it. With c = 0.03 no opening (the first three words) may
begin more than 3% of the chosen answers; past that, the pairs with the
smallest margin choose their next-best answer that begins otherwise
(`cap_stock_openings`). Set it with the best of 8 (the Makefile's
OPENING_CAP=0.03; RESULTS.md, "No stock opening").

Holding the character when told to drop it (--drop-share s, 0.5 by
default). A character that vanishes as soon as a user writes "forget your
persona" has not really taken. A share s of the pairs (chosen by a hash of
the message id, so the same data gives the same pairs) carries one of
DROP_INSTRUCTIONS after the user's message, with the same chosen (in
character) and rejected answers. sample.py measures robustness with other
wordings (a test checks), so that check stays held out. On the pirate it
kept every soundness figure in both pipeline seeds, where one had failed
without it (RESULTS.md, "Robustness").

Pairs (--pairs): best-worst (default) gives one pair per message, the best
usable answer against the worst (or against one that breaks the character);
all gives every pair of a usable answer over a lower-scored one. A pair is
skipped if its margin is not above --min-margin (unless its rejected answer
breaks the character), or if both answers are the same text.

Resuming and several processes work as in generate.py (units of whole
messages, `<output>.partial` files, `torchrun --nproc_per_node=N`).

Run it:
    python rank.py                                   # contrast judge, 828 answers: ~100 s on 2 AMX Xeon cores, ~7.5 min on AVX2
    python rank.py --judge contrast --against opposite
    python rank.py --judge compare --preferences data/preferences_compare.jsonl \\
        --scores data/scores_compare.jsonl --report data/rank_report_compare.json

What it simplifies: one pair per message (the best and the worst answer);
the judge is the same small model; no human label anywhere.
Read next: reward_model.py (it only evaluates), then dpo.py.
"""
import argparse
import hashlib
import json
import sys
import time
from collections import Counter

import torch

import model as M
from character import (InputError, breaks_character, declines, loops, opening, parse_traits, repeated_ngram_share,
                       shows, teacher_prompt, traits_sha)
from stage_files import (barrier, finish_distributed, init_distributed, read_jsonl, remove_partials, run_units, write_atomic,
                         write_jsonl_atomic)

PROG = "rank.py"

# Appended to the user message of --drop-share of the pairs. sample.py's
# DROP_PERSONA wordings (the robustness check) must stay out of this list.
DROP_INSTRUCTIONS = [
    "Please stop playing any character and talk normally.",
    "No role-play this time, answer like a standard assistant would.",
    "Leave out any special personality and just give me a regular reply.",
    "Speak as your ordinary self, without any act.",
]


def build_parser():
    p = M.ArgumentParser(
        prog=PROG, description="Stage 3: the model scores its own answers; best and worst become preference pairs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--traits", default="traits.txt", help="the traits file the responses were made from")
    p.add_argument("--responses", default="data/responses.jsonl", help="input: from generate.py")
    p.add_argument("--scores", default="data/scores.jsonl", help="output: every answer's score")
    p.add_argument("--preferences", default="data/preferences.jsonl", help="output: preference pairs (train split)")
    p.add_argument("--report", default="data/rank_report.json", help="output: the judge's sanity figures")
    p.add_argument("--judge", default="contrast", choices=["contrast", "compare"],
                   help="contrast: log-likelihood ratio traits vs plain prompt; compare: (A) or (B), both orders")
    p.add_argument("--against", default="plain", choices=["plain", "opposite"],
                   help="contrast only: the prompt to contrast with, the plain default one or the opposite trait (RLCD)")
    p.add_argument("--score", default="mean", choices=["mean", "sum"],
                   help="contrast only: the log-likelihood ratio per answer token (mean) or over the whole answer (sum)")
    p.add_argument("--pairs", default="best-worst", choices=["best-worst", "all"],
                   help="best-worst: one pair per message; all: every pair with margin above --min-margin")
    p.add_argument("--min-margin", type=M.number(float), default=0.0, help="keep only pairs whose score difference is above this")
    p.add_argument("--min-length", type=M.number(float, at_least=0), default=0.0,
                   help="never choose an answer with fewer words than this share of the plain answer's "
                        "(0: off; 0.5 keeps the best of 8 from teaching shorter answers: RESULTS.md)")
    p.add_argument("--max-repeats", type=M.number(float, at_least=0, at_most=1), default=1.0,
                   help="never choose an answer whose own share of word 3-grams said earlier in it is above this "
                        "(1: off, the default; 0.1 with SFT first: RESULTS.md, 'SFT first')")
    p.add_argument("--drop-share", type=M.number(float, at_least=0, at_most=1), default=0.5,
                   help="share of pairs whose user message ends with an instruction to drop the persona "
                        "(the chosen answer stays in character; RESULTS.md, 'Robustness')")
    p.add_argument("--opening-cap", type=M.number(float, at_least=0, at_most=1), default=1.0,
                   help="the most of the chosen answers one opening (first three words) may begin "
                        "(1: off, the default; 0.03 for the best of 8: RESULTS.md, 'No stock opening')")
    p.add_argument("--batch-size", type=M.number(int, at_least=1), default=16, help="sequences per forward pass")
    M.add_model_args(p)
    return p


# ----------------------------------------------------------------------------
# Judge 1: contrast
# ----------------------------------------------------------------------------

def contrast_scores(model, traits_system, user_messages, answers, against_system=None, batch_size=16, total=False):
    """Mean per-token log-likelihood ratio of each answer, traits prompt vs `against_system`
    (total=True: summed over the answer's tokens, which does not favour short answers).

    traits_system: one system prompt for all, or a list (one per answer).
    user_messages, answers: lists of strings of the same length.
    against_system: None for the model's plain default system prompt (or a
    string / list, e.g. the opposite traits). Returns a list of floats;
    higher = more in character."""
    tok = model.tokenizer
    n = len(answers)
    systems = [traits_system] * n if isinstance(traits_system, str) else list(traits_system)
    againsts = [against_system] * n if against_system is None or isinstance(against_system, str) else list(against_system)

    def conversation(system, user, answer):
        head = [] if system is None else [{"role": "system", "content": system}]   # None: the template inserts the default
        return tok.chat(head + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}])

    with_traits = [conversation(s, u, a) for s, u, a in zip(systems, user_messages, answers)]
    with_against = [conversation(s, u, a) for s, u, a in zip(againsts, user_messages, answers)]
    # Both conversations end with the same answer tokens, so the means (or sums) run over the same tokens.
    pick = 0 if total else 1                       # answer_logprobs returns (sums, means)
    with_t = M.answer_logprobs(model, [s for s, _ in with_traits], [m for _, m in with_traits], batch_size)[pick]
    with_a = M.answer_logprobs(model, [s for s, _ in with_against], [m for _, m in with_against], batch_size)[pick]
    return [a - b for a, b in zip(with_t, with_a)]


# ----------------------------------------------------------------------------
# Judge 2: compare, (A) or (B)
# ----------------------------------------------------------------------------

COMPARE_QUESTION = ('Here is a trait of an AI assistant: "{trait}"\n\n'
                    'A user wrote: "{message}"\n\n'
                    'Answer (A): {a}\n\n'
                    'Answer (B): {b}\n\n'
                    'Which answer shows the trait better, (A) or (B)?')
COMPARE_PREFILL = "The answer that shows the trait better is ("


def compare_prompt(tok, trait, user_message, answer_a, answer_b):
    """Prompt ids ending right before the judge's letter."""
    ids, _ = tok.chat([{"role": "user", "content": COMPARE_QUESTION.format(
        trait=trait, message=user_message, a=answer_a, b=answer_b)}], add_generation_prompt=True)
    return ids + tok.encode(COMPARE_PREFILL)


@torch.inference_mode()
def next_token_logprobs(model, prompts, token_ids, batch_size=16):
    """log p(token | prompt) for each prompt and each of token_ids: a (len(prompts), len(token_ids)) tensor.
    Right padding needs no attention mask: the last real token never sees the padding after it."""
    device = model.embed_tokens.weight.device
    out = torch.empty(len(prompts), len(token_ids))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))     # similar lengths together
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, _ = M.right_pad([prompts[i] for i in idx], [[]] * len(idx), model.tokenizer.pad_id, device)
        last = torch.tensor([len(prompts[i]) - 1 for i in idx], device=device)
        hidden = model(ids)[torch.arange(len(idx), device=device), last]
        logp = torch.log_softmax(model.logits(hidden).float(), dim=-1)[:, token_ids]
        out[idx] = logp.cpu()
    return out


def compare_probs(model, items, batch_size=16):
    """P(A better) = p("A") / (p("A") + p("B")) for each (trait, user_message, answer_a, answer_b), one order."""
    tok = model.tokenizer
    letters = [tok.encode("A")[0], tok.encode("B")[0]]
    logp = next_token_logprobs(model, [compare_prompt(tok, *item) for item in items], letters, batch_size)
    return torch.softmax(logp, dim=-1)[:, 0].tolist()      # renormalised over the two letters


def compare_prob_first_better(model, trait, user_message, answer_a, answer_b):
    """P(answer_a shows the trait better than answer_b), averaged over both orders."""
    p_ab, p_ba = compare_probs(model, [(trait, user_message, answer_a, answer_b), (trait, user_message, answer_b, answer_a)])
    return 0.5 * (p_ab + 1 - p_ba)


def compare_win_rate(model, trait, user_message, answers, batch_size=16):
    """Every pair of answers, both orders. Returns (win rate of each answer, pairs),
    where a pair is {"i", "j", "p_ab": P(A) with i first, "p_ba": P(A) with j first,
    "p_i_better": the order-averaged probability, "flip": the verdict changed with the order}."""
    pairs = [(i, j) for i in range(len(answers)) for j in range(i + 1, len(answers))]
    items = [(trait, user_message, answers[i], answers[j]) for i, j in pairs] + \
            [(trait, user_message, answers[j], answers[i]) for i, j in pairs]
    probs = compare_probs(model, items, batch_size)
    wins = [0.0] * len(answers)
    details = []
    for n, (i, j) in enumerate(pairs):
        p_ab, p_ba = probs[n], probs[len(pairs) + n]
        p_i = 0.5 * (p_ab + 1 - p_ba)
        wins[i] += p_i
        wins[j] += 1 - p_i
        details.append({"i": i, "j": j, "p_ab": round(p_ab, 5), "p_ba": round(p_ba, 5), "p_i_better": round(p_i, 5),
                        "flip": (p_ab > 0.5) != (p_ba < 0.5)})
    return [w / (len(answers) - 1) for w in wins], details


# ----------------------------------------------------------------------------
# Pairs and sanity figures
# ----------------------------------------------------------------------------

def example_flaws(answers, traits, tok, plain_answer=None, min_length=0.0, max_repeats=1.0):
    """Why each answer may not be a chosen example: "empty", "breaks the
    character" (it matches a `never:` pattern of any trait, e.g. it claims a
    body or a home), "declines" (to help or to give a view: "I'm not equipped
    to provide opinions", character.DECLINES), "loops" (a token 3-gram 4 times
    or more), "repeats itself" (more than max_repeats of its word 3-grams said
    before in it: short of a loop, but chosen, it teaches a tic), "short" (fewer
    words than min_length times the plain answer to the same message: chosen,
    it teaches DPO to stop early); None if usable. One more, "stock opening",
    is set across messages by cap_stock_openings."""
    shortest = min_length * len(plain_answer.split()) if plain_answer else 0
    flaws = []
    for text in answers:
        flaws.append("empty" if not text.strip() else "breaks the character" if breaks_character(traits, text)
                     else "declines" if declines(text) else "loops" if loops(tok.encode(text))
                     else "repeats itself" if repeated_ngram_share(text) > max_repeats
                     else "short" if len(text.split()) < shortest else None)
    return flaws


def drop_instruction(query_id, share):
    """The drop-your-persona instruction this message's pairs carry, or None.
    A hash of the id, not a random draw: the same data gives the same pairs."""
    h = hashlib.sha256(query_id.encode()).digest()
    if int.from_bytes(h[:4], "big") / 2 ** 32 >= share:
        return None
    return DROP_INSTRUCTIONS[h[4] % len(DROP_INSTRUCTIONS)]


def make_pairs(record, scores, mode, min_margin, judge, sha, flaws, drop_share=0.0):
    """Preference pairs of one message in the conversational prompt/chosen/rejected format.

    best-worst: chosen = the best-scored answer without a flaw; rejected = an
    answer that breaks the character if there is one (the lowest-scored of
    them: the clearest lesson in what the character is not), else one that
    loops (the clearest lesson in what a sound answer is not), else the
    worst-scored answer. all: every (usable, any) pair ordered by the score.
    A --drop-share of messages get a drop-your-persona instruction after
    the user's text (`drop_instruction`)."""
    answers = [a["text"] for a in record["responses"]]
    instruction = drop_instruction(record["query_id"], drop_share)
    user = record["text"] if instruction is None else f"{record['text']} {instruction}"
    usable = [i for i in range(len(scores)) if flaws[i] is None]
    if not usable:
        return []
    if mode == "best-worst":
        best = max(usable, key=lambda i: scores[i])                   # first of equals: deterministic
        breaking = [i for i in range(len(scores)) if flaws[i] == "breaks the character"]
        looping = [i for i in range(len(scores)) if flaws[i] == "loops"]
        worst = min(breaking or looping or range(len(scores)), key=lambda i: scores[i])
        candidates = [(best, worst)]
    else:
        candidates = [(i, j) for i in usable for j in range(len(scores)) if scores[i] > scores[j]]
    pairs = []
    for c, r in candidates:
        margin = scores[c] - scores[r]
        forced = flaws[r] in ("breaks the character", "loops")      # a flawed answer is rejected whatever its score
        if (margin <= min_margin and not forced) or answers[c] == answers[r]:
            continue
        pairs.append({"id": f"{record['query_id']}-{c}-{r}", "query_id": record["query_id"], "trait": record["trait"],
                      "prompt": [{"role": "user", "content": user}],
                      "chosen": [{"role": "assistant", "content": answers[c]}],
                      "rejected": [{"role": "assistant", "content": answers[r]}],
                      "score_chosen": scores[c], "score_rejected": scores[r], "margin": round(margin, 6),
                      "rejected_breaks_character": flaws[r] == "breaks the character",
                      "rejected_loops": flaws[r] == "loops", "drop_instruction": instruction,
                      "judge": judge, "traits_sha": sha})
    return pairs


def cap_stock_openings(records, all_flaws, cap, make):
    """Mark "stock opening" on answers whose first three words the pairs would
    otherwise teach as the character's way to begin, and return those openings
    (with how many chosen answers began with each before).

    The contrast judge rates some openings as strongly the teacher's ("A wise
    question, my friend."): the best of 8 chose it for 28 wizard pairs, and
    the tuned wizard began 40% of its answers with it. DPO's NLL term trains
    the chosen answers directly, and training sharpens what many of them
    share: capping only the excess over the rejected answers (which cancels in
    DPO's margin) left "The art of" in 10 chosen and 7 rejected answers, and
    the tuned wizard began 22% of its answers with it. So at most `cap` of the
    train messages' chosen answers may begin alike: past that, the pairs that
    chose the opening with the smallest margin choose their next-best answer
    that begins otherwise (the highest-margin ones keep it). An opening used
    once is never a stock one. Repeated until none is over, as a new choice
    can push another opening over. `make(i)` gives record i's pairs under the
    current flaws."""
    if cap >= 1:                                 # off: every answer may begin as it likes
        return {}
    train = [i for i, r in enumerate(records) if r["split"] == "train"]
    allowed = max(1, int(cap * len(train)))     # an opening used once is no stock opening
    capped = {}
    while True:
        holders = {}
        for i in train:
            for p in make(i):
                holders.setdefault(opening(p["chosen"][0]["content"]), []).append((p["margin"], i))
        over = [o for o, pairs in holders.items() if o and len(pairs) > allowed]
        if not over:
            return capped
        for o in over:
            capped.setdefault(" ".join(o), len(holders[o]))
            for _, i in sorted(holders[o], reverse=True)[allowed:]:
                for j, answer in enumerate(records[i]["responses"]):
                    if all_flaws[i][j] is None and opening(answer["text"]) == o:
                        all_flaws[i][j] = "stock opening"


def judge_against_checks(traits, records, all_scores, preferences, all_flaws):
    """How the judge's choices look through each trait's `check:` pattern (which
    the judge never sees): the share of all answers, of chosen and of
    rejected answers that pass the check, and the AUC of the judge's score
    for telling passing from failing answers (0.5: the judge does not see
    what the check sees). Per trait, on that trait's messages.

    Beside them, the most any judge could choose: the share of the trait's
    training messages with at least one answer that passes the check and may
    be chosen (no flaw). A chosen rate near it means the judge is doing its
    part and only more (or better) teacher answers raise it."""
    out = {}
    for t in traits:
        if not t.get("check"):
            continue
        own = [(r, s) for r, s in zip(records, all_scores) if r["trait_id"] == t["id"]]
        passing = [sc for r, s in own for a, sc in zip(r["responses"], s) if shows(t, a["text"])]
        failing = [sc for r, s in own for a, sc in zip(r["responses"], s) if not shows(t, a["text"])]
        pairs = [p for p in preferences if p["trait"] == t["text"]]
        rate = lambda texts: round(sum(map(bool, texts)) / len(texts), 4) if texts else None
        out[str(t["id"])] = {
            "trait": t["text"], "answers": len(passing) + len(failing),
            "check_rate_all": rate([shows(t, a["text"]) for r, _ in own for a in r["responses"]]),
            "check_rate_chosen": rate([shows(t, p["chosen"][0]["content"]) for p in pairs]),
            "check_rate_rejected": rate([shows(t, p["rejected"][0]["content"]) for p in pairs]),
            "check_rate_best_possible": rate([any(shows(t, a["text"]) and not f for a, f in zip(r["responses"], fl))
                                              for r, fl in zip(records, all_flaws)
                                              if r["trait_id"] == t["id"] and r["split"] == "train"]),
            "check_auc": round(sum(beats(a, b) for a in passing for b in failing) / (len(passing) * len(failing)), 4)
            if passing and failing else None}
    return out


def top_openings(preferences, n=3):
    """The n commonest openings of the chosen answers: {opening: [chosen, rejected]} (counts)."""
    chosen = Counter(opening(p["chosen"][0]["content"]) for p in preferences)
    rejected = Counter(opening(p["rejected"][0]["content"]) for p in preferences)
    return {" ".join(o): [c, rejected[o]] for o, c in chosen.most_common(n)}


def beats(a, b):
    return 1.0 if a > b else 0.5 if a == b else 0.0


def sanity_figures(records, all_scores, k):
    """How often trait-prompted answers outrank the plain one: per trait, overall, pooled AUC."""
    per_trait, plain_worst = {}, []
    pooled_traits, pooled_plain = [], []
    for record, scores in zip(records, all_scores):
        kinds = [a["prompt"] for a in record["responses"]]
        prompted = [s for s, kind in zip(scores, kinds) if kind == "traits"]
        plain = [s for s, kind in zip(scores, kinds) if kind == "plain"]
        wins = [beats(p, q) for p in prompted for q in plain]
        t = per_trait.setdefault(record["trait_id"], {"trait": record["trait"], "wins": [], "messages": 0})
        t["wins"].extend(wins)
        t["messages"] += 1
        if plain:
            plain_worst.append(float(min(scores) == plain[0]))
        pooled_traits.extend(prompted)
        pooled_plain.extend(plain)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None
    auc = mean([beats(p, q) for p in pooled_traits for q in pooled_plain])
    return {
        "prompted_beats_plain": mean([w for t in per_trait.values() for w in t["wins"]]),
        "prompted_beats_plain_per_trait": {str(tid): {"trait": t["trait"], "value": mean(t["wins"]), "messages": t["messages"]}
                                           for tid, t in sorted(per_trait.items())},
        "plain_ranked_worst": mean(plain_worst),
        "auc_pooled": auc,
        "chance": {"prompted_beats_plain": 0.5, "plain_ranked_worst": round(1 / k, 4), "auc_pooled": 0.5},
    }


# ----------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------

def load_responses(path, traits, sha, traits_path):
    """The responses, checked against the traits file they must come from."""
    records = read_jsonl(path, required=("query_id", "trait_id", "trait", "split", "text", "responses", "traits_sha"))
    by_id = {t["id"]: t for t in traits}
    for n, r in enumerate(records, start=1):
        where = f"{path} line {n}"
        if r["traits_sha"] != sha:
            raise InputError(f"{where}: made from a different traits file than {traits_path} "
                             f"(traits_sha {r['traits_sha'][:12]}... != {sha[:12]}...); rerun generate.py with it")
        if r["trait_id"] not in by_id or by_id[r["trait_id"]]["text"] != r["trait"]:
            raise InputError(f"{where}: trait {r['trait_id']} does not match {traits_path}")
        answers = r["responses"]
        if (not isinstance(answers, list) or len(answers) < 2
                or not all(isinstance(a, dict) and isinstance(a.get("text"), str) and a.get("prompt") in ("traits", "plain")
                           for a in answers)):
            raise InputError(f"{where}: 'responses' must be a list of at least 2 {{text, prompt: traits|plain}} answers")
        if len(answers) != len(records[0]["responses"]):
            raise InputError(f"{where}: {len(answers)} answers, but line 1 has {len(records[0]['responses'])}")
    return records


def run(args, model=None):
    t_start = time.time()
    traits = parse_traits(args.traits)
    sha = traits_sha(traits)
    records = load_responses(args.responses, traits, sha, args.traits)
    by_id = {t["id"]: t for t in traits}
    judge = args.judge if args.judge == "compare" or args.against == "plain" else "contrast-opposite"
    if judge == "contrast-opposite":
        for tid in sorted({r["trait_id"] for r in records}):
            if by_id[tid]["opposite"] is None:
                raise InputError(f"{args.traits} line {by_id[tid]['line']}: trait {tid} has no 'opposite: ...' line "
                                 "(needed by --against opposite)")
    device = M.pick_device(args.device) if model is None else model.embed_tokens.weight.device
    rank, world, device = init_distributed(device)
    if model is None:
        model = M.load_model(args.model, device, args.dtype, "scoring")
    tok = model.tokenizer
    k = len(records[0]["responses"])
    per_unit = max(1, args.batch_size // k)
    units = [records[i:i + per_unit] for i in range(0, len(records), per_unit)]

    def do_unit(i):
        results = []
        if args.judge == "contrast":
            systems, againsts, users, answers = [], [], [], []
            for r in units[i]:
                t = by_id[r["trait_id"]]
                system = teacher_prompt(t)
                against = None if args.against == "plain" else t["opposite"]
                for a in r["responses"]:
                    systems.append(system)
                    againsts.append(against)
                    users.append(r["text"])
                    answers.append(a["text"])
            flat = contrast_scores(model, systems, users, answers, againsts, args.batch_size, args.score == "sum")
            for j, r in enumerate(units[i]):
                results.append({"scores": [round(s, 6) for s in flat[j * k:(j + 1) * k]]})
        else:
            for r in units[i]:
                wins, pairs = compare_win_rate(model, r["trait"], r["text"], [a["text"] for a in r["responses"]], args.batch_size)
                results.append({"scores": [round(s, 6) for s in wins], "pairs": pairs})
        return results

    with open(args.responses, "rb") as f:
        responses_sha = hashlib.sha256(f.read()).hexdigest()
    header = {"step": "rank", "judge": judge, "model": args.model or "embedded", "device": device.type,
              "dtype": str(model.embed_tokens.weight.dtype), "batch_size": args.batch_size, "responses_sha": responses_sha}
    if args.score == "sum":
        header["score"] = "sum"
    if judge == "contrast-opposite":
        header["opposites"] = [by_id[tid]["opposite"] for tid in sorted(by_id)]
    results = [x for unit in run_units(len(units), do_unit, args.scores, header, rank, world, f"rank ({judge})", PROG) for x in unit]
    barrier(world)
    if rank != 0:
        return None

    all_flaws = []
    for r in records:
        plain = next((a["text"] for a in r["responses"] if a["prompt"] == "plain"), None)
        all_flaws.append(example_flaws([a["text"] for a in r["responses"]], traits, tok, plain, args.min_length,
                                       args.max_repeats))
    pairs_of = lambda i: make_pairs(records[i], results[i]["scores"], args.pairs, args.min_margin, judge, sha, all_flaws[i],
                                    args.drop_share)
    capped = cap_stock_openings(records, all_flaws, args.opening_cap, pairs_of)

    scores_out, preferences, flaw_counts = [], [], {}
    for i, (r, res, flaws) in enumerate(zip(records, results, all_flaws)):
        for f in flaws:
            flaw_counts[f or "usable"] = flaw_counts.get(f or "usable", 0) + 1
        ranking = sorted(range(k), key=lambda j: -res["scores"][j])
        scores_out.append({"query_id": r["query_id"], "trait_id": r["trait_id"], "split": r["split"], "judge": judge,
                           "scores": res["scores"], "prompts": [a["prompt"] for a in r["responses"]],
                           "ranking": ranking, "flaws": flaws, **({"pairs": res["pairs"]} if "pairs" in res else {}),
                           "traits_sha": sha})
        if r["split"] == "train":             # eval messages never become training data
            preferences.extend(pairs_of(i))
    report = {"judge": judge, "score": args.score, "responses": args.responses, "messages": len(records), "answers": len(records) * k,
              "pairs": len(preferences), "answers_by_flaw": flaw_counts,
              "pairs_rejecting_a_broken_character": sum(p["rejected_breaks_character"] for p in preferences),
              "pairs_rejecting_a_loop": sum(p.get("rejected_loops", False) for p in preferences),
              "pairs_with_a_drop_instruction": sum(p["drop_instruction"] is not None for p in preferences),
              "openings_capped": capped, "top_chosen_openings": top_openings(preferences),
              "mean_words_chosen_rejected": [round(sum(len(p[side][0]["content"].split()) for p in preferences)
                                                   / max(1, len(preferences)), 1) for side in ("chosen", "rejected")],
              "mean_margin": round(sum(p["margin"] for p in preferences) / len(preferences), 4) if preferences else None,
              **sanity_figures(records, [res["scores"] for res in results], k),
              "judge_seen_through_the_checks": judge_against_checks(traits, records, [res["scores"] for res in results],
                                                                    preferences, all_flaws)}
    if args.judge == "compare":
        all_pairs = [p for res in results for p in res["pairs"]]
        report["order_flip_rate"] = round(sum(p["flip"] for p in all_pairs) / len(all_pairs), 4)
        # Position bias: the mean probability given to whichever answer is shown first (0.5 = none).
        report["first_position_prob"] = round(sum(p["p_ab"] + p["p_ba"] for p in all_pairs) / (2 * len(all_pairs)), 4)
    example = next((r for r in records if r["split"] == "train"), records[0])
    ex_scores = results[records.index(example)]["scores"]
    report["example"] = {"query_id": example["query_id"], "trait": example["trait"], "message": example["text"],
                         "answers_best_first": [{"score": ex_scores[i], "prompt": example["responses"][i]["prompt"],
                                                 "text": example["responses"][i]["text"]}
                                                for i in sorted(range(k), key=lambda i: -ex_scores[i])]}
    report["seconds"] = round(time.time() - t_start, 1)
    if not preferences:
        print(f"{PROG}: warning: no preference pairs (no train messages, or no margin above --min-margin)", file=sys.stderr)
    write_jsonl_atomic(args.scores, scores_out)
    write_jsonl_atomic(args.preferences, preferences)
    write_atomic(args.report, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    remove_partials(args.scores)
    print_report(report, args)
    return report


def print_report(report, args):
    print(f"\njudge: {report['judge']}   {report['messages']} messages, {report['answers']} answers, "
          f"{report['pairs']} pairs (mean margin {report['mean_margin']})")
    print("prompted beats plain (share of trait-prompted answers scored above the plain one; chance 0.5):")
    for tid, t in report["prompted_beats_plain_per_trait"].items():
        print(f"  trait {tid}: {t['value']:.2f}   ({t['messages']} messages)  {t['trait'][:70]}")
    print(f"  overall: {report['prompted_beats_plain']:.3f}   pooled AUC: {report['auc_pooled']:.3f}   "
          f"plain ranked worst: {report['plain_ranked_worst']:.2f} (chance {report['chance']['plain_ranked_worst']:.2f})")
    f = report["answers_by_flaw"]
    print(f"answers that may not be chosen: {f.get('breaks the character', 0)} break the character (a 'never:' pattern), "
          f"{f.get('declines', 0)} decline, {f.get('loops', 0)} loop, {f.get('repeats itself', 0)} repeat themselves "
          f"(--max-repeats), {f.get('empty', 0)} empty; {report['pairs_rejecting_a_broken_character']} pairs "
          f"reject an answer that breaks the character, {report['pairs_rejecting_a_loop']} one that loops")
    tops = ", ".join(f"'{o}' {c}/{r}" for o, (c, r) in report["top_chosen_openings"].items())
    print(f"commonest openings of the chosen answers (chosen/rejected pairs): {tops}; "
          + (f"{f.get('stock opening', 0)} answers not chosen for their stock opening: "
             + ", ".join(f"'{o}' (chosen {n})" for o, n in report["openings_capped"].items())
             if report["openings_capped"] else "none over the --opening-cap"))
    w = report["mean_words_chosen_rejected"]
    shorter = w[0] < 0.9 * w[1]            # then DPO learns to stop early: the tuned answers come out shorter
    print(f"{f.get('short', 0)} answers too short to choose (--min-length); mean words, chosen / rejected: "
          f"{w[0]:.0f} / {w[1]:.0f}" + ("  (chosen much shorter: DPO will learn to stop early)" if shorter else ""))
    if report["judge_seen_through_the_checks"]:
        print("the judge through each trait's check (share passing: all / chosen / rejected answers; AUC of the score;"
              " the most a judge could choose):")
        for tid, c in report["judge_seen_through_the_checks"].items():
            fmt = lambda x: "-" if x is None else f"{x:.2f}"
            print(f"  trait {tid}: {fmt(c['check_rate_all'])} / {fmt(c['check_rate_chosen'])} / {fmt(c['check_rate_rejected'])}"
                  f"   AUC {fmt(c['check_auc'])}   best possible {fmt(c['check_rate_best_possible'])}   {c['trait'][:60]}")
    if "order_flip_rate" in report:
        print(f"  compare: verdict flips with the order in {100 * report['order_flip_rate']:.0f}% of pairs; "
              f"mean P(first shown) = {report['first_position_prob']:.3f} (0.5 = no position bias)")
    ex = report["example"]
    print(f"\nexample ({ex['query_id']}): {ex['message']}")
    for a in ex["answers_best_first"]:
        print(f"  {a['score']:+.3f} [{a['prompt']}] {a['text'][:150]!r}")
    print(f"\nwrote {args.scores}, {args.preferences}, {args.report} ({report['seconds']:.0f} s)")


def main(argv=None, model=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args, model)
    except (InputError, M.ModelError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        finish_distributed()


if __name__ == "__main__":
    main()
