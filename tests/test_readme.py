"""The README's exercises and stage sections are commands a student types:
every one of them must parse (a script's own argument parser, a Makefile
target, a test that exists), and read files that exist (or that the demo or
the exercise makes)."""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import ROOT


def exercises():
    """The numbered exercises of README's Exercises section, each as its text."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Exercises\n", 1)[1].split("\n## ", 1)[0]
    return re.split(r"\n(?=\d+\. \*\*)", section)[1:]


def commands_in(text):
    """The commands of one exercise: `python ...` lines of its fenced blocks (continuation
    lines joined), and `python ...` / `make ...` written inline in backticks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip().startswith("python "):
                commands.append(line.strip())
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [" ".join(c.split()) for c in re.findall(r"`((?:python|make) [^`]+)`", prose)]
    return commands


def told_to_write(path):
    """A traits file the student writes in an exercise (personas/mine.txt) is named there as "to <file>"."""
    return any(f"to `{path}`" in " ".join(text.split()) for text in exercises())


def exercise_commands():
    return [c for text in exercises() for c in commands_in(text)]


INPUTS = {"rank.py": ["responses"], "dpo.py": ["preferences"], "sample.py": ["queries", "reward_model"]}


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0] + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_exercise_has_a_command():
    for text in exercises():
        assert commands_in(text), f"exercise without a command: {text.splitlines()[0]}"


def test_every_exercise_says_what_to_check_and_about_how_long():
    """At least 6 exercises; each names what to check and about how long it takes."""
    found = exercises()
    assert len(found) >= 6
    for text in found:
        title = text.splitlines()[0]
        assert "Check" in text, f"exercise without a check: {title}"
        assert re.search(r"\((~?\d+ min|as long as the demo)\)", text), f"exercise without a time: {title}"


@pytest.mark.parametrize("command", [c for c in exercise_commands() if c.startswith("make ")])
def test_every_make_command_of_the_exercises_names_a_target_and_a_traits_file(command):
    words = shlex.split(command)
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    targets = re.findall(r"^([a-z]+):", makefile, flags=re.M)
    variables = re.findall(r"^([A-Z]+) +\?=", makefile, flags=re.M)            # those a command line may set
    assert words[1] in targets, f"{command}: no Makefile target {words[1]}"
    for word in words[2:]:
        name, _, value = word.partition("=")
        assert name in variables, f"{command}: the Makefile has no variable {name}"
        if name == "TRAITS" and not os.path.exists(os.path.join(ROOT, value)):
            assert told_to_write(value), f"{command}: no traits file {value}"


@pytest.mark.parametrize("command", [c for c in exercise_commands() if c.startswith("python -m pytest")])
def test_every_test_an_exercise_runs_exists(command):
    for target in shlex.split(command)[3:]:
        path, _, name = target.partition("::")
        assert os.path.exists(os.path.join(ROOT, path)), f"{command}: no test file {path}"
        if name:
            assert f"def {name}(" in open(os.path.join(ROOT, path)).read(), f"{command}: no test {name}"


def stage_commands():
    """The `python ...` commands of README's stage sections, from "## The stages" to the next section."""
    text = open(os.path.join(ROOT, "README.md")).read()
    return [c for c in commands_in(text.split("## The stages\n", 1)[1].split("\n## ", 1)[0]) if c.startswith("python ")]


def test_the_stage_sections_give_at_least_six_commands():
    assert len(stage_commands()) >= 6          # the model and the five stage scripts


@pytest.mark.parametrize("command", [c for c in exercise_commands() if not c.startswith(("make ", "python -m"))]
                         + stage_commands())
def test_every_exercise_and_stage_command_parses(command):
    words = shlex.split(command, comments=True)
    script = os.path.join(ROOT, words[1])
    assert os.path.exists(script), f"no such script: {words[1]}"
    args = load_script(script).build_parser().parse_args(words[2:])      # an unknown flag or bad value: SystemExit
    traits = getattr(args, "traits", None)
    if traits and not os.path.exists(os.path.join(ROOT, traits)):
        assert told_to_write(traits), f"{command}: no traits file {traits}"
    for name in INPUTS.get(words[1], []):
        # inputs come from the demo (data/pirate/, out/pirate/) or an earlier step of the same exercise (out/ex...)
        path = getattr(args, name)
        assert path.startswith(("data/pirate/", "out/pirate/", "out/ex")), f"{command}: --{name} {path} is made by nothing"


def make_commands(target, *variables):
    """The stage commands `make <target>` would run with these variables (`make -n` prints, runs
    nothing), each as (script, its parsed arguments). The environment is cleared so that a caller's
    MAKEFLAGS or an exported TRAITS cannot change what is printed."""
    printed = subprocess.run(["make", "-n", target, *variables], cwd=ROOT, capture_output=True, text=True,
                             check=True, env={"PATH": os.environ.get("PATH", "")}).stdout
    commands = []
    for line in printed.splitlines():
        words = shlex.split(line)
        if words and words[0].endswith("python") and words[1].endswith(".py"):
            commands.append((words[1], load_script(os.path.join(ROOT, words[1])).build_parser().parse_args(words[2:])))
    return commands


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_runs_every_stage_once_and_sft_1_trains_sft_before_dpo_from_it():
    default = make_commands("demo")
    assert [script for script, _ in default] == ["generate.py", "rank.py", "reward_model.py", "dpo.py", "sample.py"]
    dpo = default[3][1]
    assert dpo.loss_type == "sigmoid" and dpo.model == default[0][1].model  # DPO from the base model
    assert default[1][1].max_repeats == 1.0                                   # the filter is off
    assert dpo.out == "out/pirate/dpo"

    for target in ("demo", "smoke"):
        recipe = make_commands(target, "TRAITS=personas/cowboy.txt", "SEED=2", "SFT=1", "MAX_REPEATS=0.1")
        assert [script for script, _ in recipe] == ["generate.py", "rank.py", "reward_model.py", "dpo.py", "dpo.py",
                                                    "sample.py"]
        rank, sft, dpo, sample = recipe[1][1], recipe[3][1], recipe[4][1], recipe[5][1]
        assert rank.max_repeats == 0.1
        assert sft.loss_type == "sft" and sft.epochs == 1 and sft.seed == 2
        assert sft.preferences == dpo.preferences == rank.preferences          # both learn the same pairs
        assert dpo.loss_type == "sigmoid" and dpo.model == sft.out           # DPO starts from the SFT model
        assert sample.tuned == dpo.out
        # a run of its own: the default run's files are kept
        name = "cowboy-seed2-sft" if target == "demo" else "smoke-cowboy-seed2-sft"
        assert sft.out == f"out/{name}/sft" and rank.preferences == f"data/{name}/preferences.jsonl"
