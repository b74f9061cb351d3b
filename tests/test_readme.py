"""The README's exercises are commands a student types: every one of them
must parse with the stage's own argument parser, and read files that exist
(or that the demo writes)."""
import importlib.util
import os
import re
import shlex

import pytest

from conftest import ROOT


def exercise_commands():
    """Every `python ...` command in the fenced blocks of README's Exercises section (continuation lines joined)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Exercises\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip().startswith("python "):
                commands.append(line.strip())
    return commands


INPUTS = {"rank.py": ["responses"], "dpo.py": ["preferences"], "sample.py": ["queries", "reward_model"]}


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0] + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exercises():
    """The numbered exercises of README's Exercises section, each as its text."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Exercises\n", 1)[1].split("\n## ", 1)[0]
    return re.split(r"\n(?=\d+\. \*\*)", section)[1:]


def test_the_readme_has_exercises_with_commands():
    assert len(exercise_commands()) >= 5


def test_every_exercise_says_what_to_check_and_about_how_long():
    """At least 6 exercises; each names what to check and about how long it takes."""
    found = exercises()
    assert len(found) >= 6
    for text in found:
        title = text.splitlines()[0]
        assert "Check" in text, f"exercise without a check: {title}"
        assert re.search(r"\((~?\d+ min|as long as the demo)\)", text), f"exercise without a time: {title}"


@pytest.mark.parametrize("command", exercise_commands())
def test_every_exercise_command_parses(command):
    words = shlex.split(command)
    script = os.path.join(ROOT, words[1])
    assert os.path.exists(script), f"no such script: {words[1]}"
    args = load_script(script).build_parser().parse_args(words[2:])      # an unknown flag or bad value: SystemExit
    traits = getattr(args, "traits", None)
    if traits:
        assert os.path.exists(os.path.join(ROOT, traits)), f"{command}: no traits file {traits}"
    for name in INPUTS.get(words[1], []):
        # inputs come from the demo (data/pirate/, out/pirate/) or an earlier step of the same exercise (out/ex...)
        path = getattr(args, name)
        assert path.startswith(("data/pirate/", "out/pirate/", "out/ex")), f"{command}: --{name} {path} is made by nothing"
