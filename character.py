"""The character: the traits file, the teacher's prompt, and the checks.

Reads:  a traits file (traits.txt, personas/*.txt; the format below).
Writes: nothing; every stage imports it.

Every stage needs the same few things about the character, so they live
here, beside model.py: how the traits file is read, the system prompt the
teacher answers with (generate.py, rank.py, sample.py), the SHA that ties
every data file to the traits file it came from, and four readable tests
of an answer: does it show a trait (`check:`), does it break the character
(`never:`), does it decline to help (DECLINES, the same for every
character), does it loop.

The traits file (traits.txt, personas/*.txt). Blocks separated by blank
lines, one block per trait; "#" starts a comment:

    role: You are a pirate.                 <- optional, before the first block:
                                               the teacher's role for every trait
    I talk like an old sea pirate, ...      <- the trait, in the first person
    - How do I boil an egg?                 <- 3 to 6 seed user messages
    - What's the best way to save money?
    role: ...                               <- optional: this trait's own role
    check: \\b(arr+|matey|ahoy)\\b            <- optional: a regular expression; an
                                               answer that matches shows the trait
    never: \\bmy (body|eyes|home)\\b          <- optional: an answer that matches
                                               breaks the character (any trait's)
    opposite: I talk like an office worker. <- optional (rank.py --against opposite)

The teacher's prompt. A 135M model follows a short role in the second person
("You are a pirate.") far better than a description of itself: with the role
and the trait line as its system prompt, 59% of its answers to everyday
requests carry pirate words; with the trait wrapped as "This is your
character, in your own words: ..." after its default system message, 7%;
with its plain prompt, 0% (RESULTS.md, "The teacher's ceiling"). The teacher prompt of a trait is its role
followed by the trait line; a trait with no role (here or at the top of the
file) gets the trait line alone.

The checks are what sample.py measures the character with. They are never
used to choose training data, so they stay independent of the training:
rank.py's judge chooses the pairs. `never:` patterns are the exception, and
say so: rank.py never *chooses* an answer that matches one (an answer that
claims a body or a home is a bad example for every trait), and takes one as
the rejected answer where there is one. sample.py reports their rate as a
guard ("claims a human life" must not rise), not as evidence of the
character.

`traits_sha` is the SHA-256 of everything the generated data depends on:
traits, seeds, roles and `never:` patterns. Comments, blank lines, `check:`
and `opposite:` lines do not change it: a better check can be written and
measured without making the data again.

What it simplifies: whether an answer shows a trait is a regular expression
(`check:`), not a judge: readable and the same on every machine, but blind
to a paraphrase it does not list.
Read next: generate.py.
"""
import hashlib
import json
import os
import re


class InputError(Exception):
    """Bad input: a stage prints it as one line, `<stage>.py: <message>`, and exits with status 1."""


KEYS = ("role", "check", "never", "opposite")          # the "key: value" lines a block may have


def parse_traits(path):
    """Read a traits file. Returns a list of traits, each a dict:
    {"id": 1, "text", "seeds": [str, ...], "role": str | None, "check": str | None,
     "never": str | None, "opposite": str | None, "line": int}.
    Raises InputError naming the file and line for anything malformed."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    traits, current, file_role = [], None, None
    for n, raw in enumerate(lines, start=1):
        line = raw.strip()
        if line.startswith("#"):
            continue
        if not line:
            current = None              # a blank line ends the block
            continue
        where = f"{path} line {n}"
        key = line.split(":", 1)[0].strip().lower() if ":" in line else None
        if key in KEYS:
            value = line.split(":", 1)[1].strip()
            if not value:
                raise InputError(f"{where}: empty '{key}:' line")
            if key in ("check", "never"):
                try:
                    re.compile(value)
                except re.error as e:
                    raise InputError(f"{where}: the '{key}:' pattern is not a valid regular expression ({e})") from None
            if current is None:
                if key == "role" and not traits:
                    if file_role is not None:
                        raise InputError(f"{where}: a second 'role:' line before the first trait")
                    file_role = value
                    continue
                raise InputError(f"{where}: a '{key}:' line must follow a trait's seed messages "
                                 "(only 'role:' may stand alone, before the first trait)")
            if current[key] is not None:
                raise InputError(f"{where}: a second '{key}:' line for the same trait")
            current[key] = value
            continue
        if current is None:             # first line of a block: the trait
            if line.startswith("-"):
                raise InputError(f"{where}: a block must start with the trait itself, not with {line[:12]!r} "
                                 "(is the trait line missing?)")
            if not re.search(r"[^\W\d_]", line):
                raise InputError(f"{where}: the trait has no text ({line!r})")
            if any(t["text"] == line for t in traits):
                raise InputError(f"{where}: the same trait appears twice")
            current = {"id": len(traits) + 1, "text": line, "seeds": [], "role": None, "check": None, "never": None,
                       "opposite": None, "line": n}
            traits.append(current)
        elif line.startswith("- ") or line == "-":
            seed = line[1:].strip()
            if not seed:
                raise InputError(f"{where}: empty seed message")
            current["seeds"].append(seed)
        else:
            raise InputError(f"{where}: expected a seed message starting with '- ', or a line starting with one of "
                             f"{', '.join(k + ':' for k in KEYS)} (or a blank line before the next trait), got {line[:40]!r}")
    if not traits:
        raise InputError(f"{path}: no traits found (expected blocks of a trait line followed by '- ' seed messages)")
    for t in traits:
        if not t["seeds"]:
            raise InputError(f"{path} line {t['line']}: the trait has no seed messages "
                             "(add 3 to 6 lines starting with '- ' after it)")
        t["role"] = t["role"] or file_role
    return traits


def traits_sha(traits):
    """SHA-256 of what generated data depends on: traits, seeds, roles, never-patterns."""
    content = [{"text": t["text"], "seeds": t["seeds"], "role": t.get("role"), "never": t.get("never")} for t in traits]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def teacher_prompt(trait):
    """The system prompt the teacher answers with: the trait's role, then the
    trait line ("You are a pirate. I talk like an old sea pirate, ...")."""
    return f"{trait['role']} {trait['text']}" if trait.get("role") else trait["text"]


def character_prompt(traits):
    """The whole character as one system prompt (for messages that belong to no
    one trait): each distinct role once, then every trait line."""
    roles = list(dict.fromkeys(t["role"] for t in traits if t.get("role")))
    return " ".join(roles + [t["text"] for t in traits])


def shows(trait, text):
    """True if `text` matches the trait's `check:` pattern (case-insensitive); None if it has none."""
    return None if not trait.get("check") else re.search(trait["check"], text, re.IGNORECASE) is not None


def breaks_character(traits, text):
    """True if `text` matches any trait's `never:` pattern (case-insensitive)."""
    return any(re.search(t["never"], text, re.IGNORECASE) for t in traits if t.get("never"))


# An answer that declines to help or to give a view: "I'm not equipped to provide
# opinions", "I don't have personal opinions", "I'm just an AI". The assistant's
# traits once "took" by teaching exactly this (RESULTS.md, "The other characters
# at 6e-5"): it says it is an AI, and it is no help. So rank.py never chooses
# such an answer, and sample.py counts them as a soundness figure.
DECLINES = re.compile(
    r"\b(not equipped to"
    r"|(can't|cannot|can not|unable to|not able to) (provide|offer|give|share|help with|express|form) (you )?(with )?"
    r"(any |personal |my own )*(opinions?|views?|advice|beliefs?|information|answers?|that)"
    r"|I don't have (any )?(personal )?(opinions|beliefs|views|preferences)"
    r"|I('m| am) (just|only|simply) (a|an) (helpful )?(AI|machine|program|language model|computer))", re.IGNORECASE)


def declines(text):
    """True if `text` declines to help or to give a view (DECLINES)."""
    return DECLINES.search(text) is not None


def opening(text, n=3):
    """The first n words of an answer, lower case, punctuation dropped: how
    rank.py and sample.py tell a stock opening line ("A wise question, my friend.")."""
    return tuple(re.findall(r"\w+", text.lower())[:n])


def loops(token_ids, n=3, times=4):
    """True if one n-gram of tokens occurs `times` times or more: the mark of
    an answer stuck in a loop ("1. 1. 1. 1.", "a little, a little, a little ...")."""
    counts = {}
    for i in range(len(token_ids) - n + 1):
        gram = tuple(token_ids[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def repeated_ngram_share(text, n=3):
    """Share of the word n-grams of `text` that already occurred earlier in it:
    sample.py's "repeats" figure, and what rank.py --max-repeats keeps from
    being chosen ("I'm a Southern cowboy, and I'm not about fine-tuned dishes.
    I'm a Southern cowboy, and I'm not about fine-tuned dishes.")."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)
