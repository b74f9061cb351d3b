"""Every numeric flag of every stage, of model.py and of the teacher-prompt
bench is checked before anything runs: a value that is not finite or out of
range gets one error line and exit status 2."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT
import dpo
import generate
import model as M
import rank
import reward_model
import sample


def bench_parser(name):
    """A bench script's build_parser (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser


PARSERS = {"generate.py": generate.build_parser, "rank.py": rank.build_parser, "reward_model.py": reward_model.build_parser,
           "dpo.py": dpo.build_parser, "sample.py": sample.build_parser, "model.py": M.build_parser,
           "bench/teacher_prompts.py": bench_parser("teacher_prompts")}


def numeric_flags(parser):
    return [a for a in parser._actions if a.option_strings and getattr(a.type, "__name__", None) in ("int", "float")]


@pytest.mark.parametrize("stage", sorted(PARSERS))
def test_every_numeric_flag_is_range_checked(stage):
    """No flag takes a bare int or float: each goes through model.number, which refuses NaN, inf and its bounds."""
    flags = numeric_flags(PARSERS[stage]())
    assert flags, stage
    unchecked = [a.option_strings[0] for a in flags if not hasattr(a.type, "bounds")]
    assert not unchecked, f"{stage}: {unchecked} accept any number"


def out_of_range(action):
    """A value each flag must refuse: below its lower bound, or NaN where it has none."""
    b = action.type.bounds
    if b["at_least"] is not None:
        return str(b["at_least"] - 1)
    if b["above"] is not None:
        return str(b["above"])
    return "nan" if action.type.__name__ == "float" else "1.5"


@pytest.mark.parametrize("stage", sorted(PARSERS))
def test_a_bad_number_is_one_error_line_and_exit_2(stage, capsys):
    parser = PARSERS[stage]()
    for action in numeric_flags(parser):
        for bad in {out_of_range(action), "nan", "inf", "x"}:
            if action.type.__name__ == "int" and bad in ("nan", "inf"):
                bad = "x"                       # int('nan') is already refused as not an integer
            with pytest.raises(SystemExit) as exit_:
                parser.parse_args([action.option_strings[0], bad])
            err = capsys.readouterr().err.strip()
            assert exit_.value.code == 2, (action.option_strings, bad)
            assert err.count("\n") == 0 and err.startswith(f"{parser.prog}: error: argument {action.option_strings[0]}"), err


def test_values_inside_the_bounds_are_taken():
    args = dpo.parse_args(["--beta", "0.2", "--lr", "1e-5", "--train-layers", "0", "--label-smoothing", "0"])
    assert (args.beta, args.lr, args.train_layers, args.label_smoothing) == (0.2, 1e-5, 0, 0.0)
    assert M.number(float, at_least=0, below=1)("0") == 0.0


@pytest.mark.parametrize("argv", [["dpo.py", "--lr", "nan"], ["dpo.py", "--beta", "-1"], ["generate.py", "--top-p", "0"],
                                  ["sample.py", "--seeds", "0"]])
def test_from_the_shell_a_bad_flag_writes_nothing(argv, tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "error" in run.stderr
    assert os.listdir(tmp_path) == []
