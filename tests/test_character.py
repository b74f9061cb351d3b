"""Tests of character.py: the traits file with its role, check and never
lines, the teacher's prompt, the SHA that ties data to the traits file, and
the loop detector."""
import glob
import os


import character as C
from conftest import ROOT

FILE = """# a comment
role: You are a pirate.

I talk like a pirate.
- How do I boil an egg?
- What time is it?
- Can you recommend a book?
check: \\b(arr+|matey)\\b
opposite: I talk plainly.

I never claim a body.
- What do you look like?
- Where do you live?
- Are you tired?
role: You are an AI.
never: \\bmy (body|eyes)\\b
"""


def write(tmp_path, text):
    path = tmp_path / "traits.txt"
    path.write_text(text)
    return str(path)


def test_role_check_and_never_lines_are_read(tmp_path):
    pirate, ai = C.parse_traits(write(tmp_path, FILE))
    assert pirate["role"] == "You are a pirate." and pirate["check"] == r"\b(arr+|matey)\b" and pirate["never"] is None
    assert pirate["opposite"] == "I talk plainly." and len(pirate["seeds"]) == 3
    assert ai["role"] == "You are an AI." and ai["check"] is None and ai["never"] == r"\bmy (body|eyes)\b"


def test_the_teacher_prompt_is_the_role_then_the_trait_line(tmp_path):
    """A short second-person role, then the first-person trait line; a trait's own role wins over
    the file's; with no role anywhere, the trait line alone."""
    pirate, ai = C.parse_traits(write(tmp_path, FILE))
    assert C.teacher_prompt(pirate) == "You are a pirate. I talk like a pirate."
    assert C.teacher_prompt(ai) == "You are an AI. I never claim a body."
    (plain,) = C.parse_traits(write(tmp_path, "I am kind.\n- Hi?\n"))
    assert C.teacher_prompt(plain) == "I am kind."
    assert C.character_prompt([pirate, ai]) == "You are a pirate. You are an AI. I talk like a pirate. I never claim a body."


def test_checks_and_never_patterns_match_case_insensitively(tmp_path):
    pirate, ai = C.parse_traits(write(tmp_path, FILE))
    assert C.shows(pirate, "ARR, Matey, the egg boils!") and not C.shows(pirate, "Boil the egg for nine minutes.")
    assert C.shows(ai, "anything") is None                                   # no check: no verdict
    assert C.breaks_character([pirate, ai], "My eyes are blue.") and not C.breaks_character([pirate, ai], "I have no eyes.")


def test_traits_sha_covers_what_the_data_depends_on_and_nothing_else(tmp_path):
    """Comments, blank lines, check: and opposite: lines do not change the SHA (a better check needs no new
    data); the trait text, a seed, a role and a never: pattern do."""
    sha = lambda text: C.traits_sha(C.parse_traits(write(tmp_path, text)))
    a = sha(FILE)
    assert a == sha("# another comment\n\n" + FILE + "\n\n")
    assert a == sha(FILE.replace("check: \\b(arr+|matey)\\b", "check: \\bahoy\\b").replace("I talk plainly.", "I am dull."))
    for changed in (FILE.replace("role: You are a pirate.", "role: You are a sailor."),
                    FILE.replace("never: \\bmy (body|eyes)\\b", "never: \\bmy body\\b"),
                    FILE.replace("- What time is it?", "- What day is it?"),
                    FILE.replace("I talk like a pirate.", "I talk like a sailor.")):
        assert sha(changed) != a


def test_loops_finds_a_token_3gram_repeated_4_times():
    assert C.loops([1, 2, 3] * 4) and C.loops([9, 1, 2, 3, 1, 2, 3, 5, 1, 2, 3, 7, 1, 2, 3])
    assert not C.loops([1, 2, 3] * 3 + [4]) and not C.loops(list(range(50))) and not C.loops([])


def test_every_shipped_character_has_a_role_and_a_check_per_trait():
    """traits.txt and every persona: a teacher role, 3-6 seeds and a readable check for every trait;
    the default traits protect the AI identity with never: patterns."""
    files = [os.path.join(ROOT, "traits.txt")] + sorted(glob.glob(os.path.join(ROOT, "personas", "*.txt")))
    assert len(files) >= 6
    for path in files:
        for t in C.parse_traits(path):
            assert t["role"] and t["role"].startswith("You ") and t["check"] and 3 <= len(t["seeds"]) <= 6, (path, t["text"])
            assert t["text"].startswith("I ")
    default = C.parse_traits(os.path.join(ROOT, "traits.txt"))
    assert len(default) == 7 and any(t["never"] for t in default)
    assert C.breaks_character(default, "My eyes are a deep, rich blue.")
    assert C.shows(default[3], "As an AI, I don't have a body.") and not C.shows(default[3], "I am a tall person.")
