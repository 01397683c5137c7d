"""The dataclass command line: types, booleans, recipes, unknown keys, validation, dry run, run_cli."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

from trainlib.cli import checking_input, run_cli
from trainlib.config import build_parser, config_hash, config_to_dict, parse_config, positional, save_config


@dataclass
class Cfg:
    lr: float = field(default=0.1, metadata={"help": "learning rate (2.5 % warm-up)"})
    epochs: int = 10
    name: str = "run"
    ema: bool = True
    widths: tuple[int, ...] = (16, 32)
    pair: tuple[float, float] = (0.5, 1.0)
    max_steps: int | None = None
    norm: Literal["linf", "l2"] = "linf"
    out: Path = Path("runs/x")

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Required:
    data: str
    steps: int = 1


def exit_code_and_stderr(capsys, argv, cls=Cfg):
    with pytest.raises(SystemExit) as info:
        parse_config(cls, argv)
    return info.value.code, capsys.readouterr().err


def test_defaults_and_typed_flags():
    assert parse_config(Cfg, []) == Cfg()
    argv = "--lr 0.5 --epochs 3 --name a --no-ema --widths 1 2 3 --pair 1 2 --max-steps 5 --norm l2 --out o"
    cfg = parse_config(Cfg, argv.split())
    assert cfg == Cfg(0.5, 3, "a", False, (1, 2, 3), (1.0, 2.0), 5, "l2", Path("o"))
    assert isinstance(cfg.epochs, int) and isinstance(cfg.pair[0], float)
    assert parse_config(Cfg, ["--ema"]).ema is True
    cfg = parse_config(Cfg, ["--max-steps", "none", "--widths"])
    assert cfg.max_steps is None and cfg.widths == ()
    assert "learning rate (2.5 % warm-up) (default: 0.1)" in " ".join(build_parser(Cfg).format_help().split())


@pytest.mark.parametrize(
    "argv", [["--epochs", "x"], ["--norm", "l3"], ["--pair", "1"], ["--lr", "0.1", "--bogus", "1"], ["--ema", "1"]]
)
def test_bad_flags_exit_2(capsys, argv):
    code, err = exit_code_and_stderr(capsys, argv)
    assert code == 2 and "error:" in err


def test_recipe_then_flags_override(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"_comment": "ignored", "lr": 0.3, "epochs": 7, "widths": [4], "max_steps": None}))
    cfg = parse_config(Cfg, ["--config", str(recipe), "--epochs", "9"])
    assert (cfg.lr, cfg.epochs, cfg.widths, cfg.max_steps) == (0.3, 9, (4,), None)


def test_recipe_extends_a_base_in_its_own_folder_over_a_chain(tmp_path):
    """A recipe holds only what differs from the recipe it extends; a base may extend further; flags still win."""
    (tmp_path / "root.json").write_text(json.dumps({"_comment": "root", "lr": 0.3, "epochs": 7, "name": "root"}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.json").write_text(json.dumps({"extends": "../root.json", "epochs": 8, "widths": [4]}))
    (tmp_path / "sub" / "leaf.json").write_text(json.dumps({"extends": "mid.json", "_why": "x", "name": "leaf"}))
    cfg = parse_config(Cfg, ["--config", str(tmp_path / "sub" / "leaf.json")])
    assert (cfg.lr, cfg.epochs, cfg.widths, cfg.name) == (0.3, 8, (4,), "leaf")
    assert parse_config(Cfg, ["--config", str(tmp_path / "sub" / "leaf.json"), "--lr", "0.5"]).lr == 0.5


@pytest.mark.parametrize(("files", "message"), [
    ({"a.json": {"extends": "gone.json"}}, "recipe file not found: {tmp}/gone.json (extended by {tmp}/a.json)"),
    ({"a.json": {"extends": "b.json"}, "b.json": {"extends": "a.json"}},
     "recipes extend each other in a cycle: {tmp}/a.json -> {tmp}/b.json -> {tmp}/a.json"),
    ({"a.json": {"extends": "a.json"}}, "cycle: {tmp}/a.json -> {tmp}/a.json"),
    ({"a.json": {"extends": 3}}, "'extends' must name a recipe file, got 3"),
    ({"a.json": {"extends": "b.json"}, "b.json": {"lrr": 1}}, "unknown key 'lrr' in recipe {tmp}/b.json"),
    ({"a.json": {"extends": "b.json", "lr": 1}, "b.json": {"epochs": "3"}}, "recipe {tmp}/b.json: key 'epochs'"),
])
def test_bad_extends_is_one_clear_line(tmp_path, capsys, files, message):
    for name, recipe in files.items():
        (tmp_path / name).write_text(json.dumps(recipe))
    code, err = exit_code_and_stderr(capsys, ["--config", str(tmp_path / "a.json")])
    assert code == 2 and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err


def test_extends_is_not_a_field_name():
    @dataclass
    class Clash:
        extends: str = "x"

    with pytest.raises(TypeError, match="reserved"):
        build_parser(Clash)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"lrr": 0.3}, "unknown key 'lrr'"),
        ({"epochs": "3"}, "key 'epochs': expected int"),
        ({"epochs": True}, "key 'epochs': expected int"),
        ({"pair": [1]}, "key 'pair': expected 2 values"),
        ({"norm": "l3"}, "key 'norm': expected one of"),
        ({"ema": None}, "key 'ema': null is not allowed"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_bad_recipe_is_one_clear_line(tmp_path, capsys, recipe, message):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    code, err = exit_code_and_stderr(capsys, ["--config", str(path)])
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_missing_recipe_invalid_json_and_missing_required(tmp_path, capsys):
    code, err = exit_code_and_stderr(capsys, ["--config", str(tmp_path / "nope.json")])
    assert code == 2 and "recipe file not found" in err
    (tmp_path / "bad.json").write_text("{")
    code, err = exit_code_and_stderr(capsys, ["--config", str(tmp_path / "bad.json")])
    assert code == 2 and "not valid JSON" in err
    code, err = exit_code_and_stderr(capsys, [], Required)
    assert code == 2 and "--data" in err
    assert parse_config(Required, ["--data", "digits"]) == Required("digits")


def test_validation_error_is_one_line_exit_2(capsys):
    code, err = exit_code_and_stderr(capsys, ["--lr", "-1"])
    assert (code, err) == (2, "error: lr must be > 0, got -1.0\n")


def test_dry_run_prints_resolved_config_that_reads_back(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(Cfg, ["--dry-run", "--widths", "8", "--norm", "l2"])
    assert info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == config_to_dict(Cfg(widths=(8,), norm="l2"))
    (tmp_path / "printed.json").write_text(json.dumps(printed))
    assert parse_config(Cfg, ["--config", str(tmp_path / "printed.json")]) == Cfg(widths=(8,), norm="l2")


def test_save_config_and_run_dir_config_read_back(tmp_path):
    cfg = Cfg(lr=0.2, widths=(1, 2), out=Path("a/b"))
    save_config(cfg, tmp_path / "saved.json")
    assert parse_config(Cfg, ["--config", str(tmp_path / "saved.json")]) == cfg
    (tmp_path / "config.json").write_text(json.dumps({"config": config_to_dict(cfg), "run": {"world_size": 2}}))
    assert parse_config(Cfg, ["--config", str(tmp_path / "config.json")]) == cfg


def test_config_hash_is_stable_and_sensitive_to_values():
    assert config_hash(Cfg()) == config_hash(Cfg())
    assert config_hash(Cfg()) != config_hash(Cfg(lr=0.2))
    assert len(config_hash(Cfg())) == 16


def test_run_cli_turns_input_errors_into_one_line(capsys):
    def bad_option():
        with checking_input():
            raise ValueError("eps must be > 0, got 0")

    def missing_file():
        with checking_input():
            open("/nonexistent/shard.npz")  # noqa: SIM115

    for fn, text in [(bad_option, "error: eps must be > 0, got 0\n"), (missing_file, "No such file")]:
        with pytest.raises(SystemExit) as info:
            run_cli(fn)
        err = capsys.readouterr().err
        assert info.value.code == 2 and text in err and err.count("\n") == 1
    assert run_cli(lambda: 42) == 42


def test_run_cli_keeps_tracebacks_of_bugs():
    def bug():
        raise RuntimeError("real bug")

    def dependency_value_error():  # raised inside torch, not by our validation
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))

    with pytest.raises(RuntimeError, match="real bug"):
        run_cli(bug)
    with pytest.raises(ValueError, match="batch_size"):
        run_cli(dependency_value_error)


def test_entry_point_subprocess_prints_no_traceback_only_for_bad_input(tmp_path):
    """A ValueError outside ``checking_input`` (raised mid-run) keeps its traceback and exits 1; the same error
    inside the input phase is one line and exit 2."""
    script = tmp_path / "entry.py"
    script.write_text(
        "from dataclasses import dataclass\n"
        "from trainlib.cli import run_cli\n"
        "from trainlib.config import parse_config\n"
        "@dataclass\nclass C:\n    eps: float = 1.0\n"
        "def main():\n    cfg = parse_config(C)\n    raise ValueError(f'eps {cfg.eps} is wrong')\n"
        "run_cli(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, str(script), "--eps", "2"], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "Traceback" in result.stderr
    code = ("import trainlib as t\nfrom trainlib.cli import checking_input\n"
            "def main():\n    with checking_input():\n        t.load_dataset('x')\nt.run_cli(main)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown dataset 'x'; valid names: digits")
    assert result.stderr.count("\n") == 1


@dataclass
class WithRuns:
    runs: tuple[str, ...] = positional("run directories", ("default",))
    out: str = "o"


def test_positional_field_takes_the_words_that_are_not_options(tmp_path):
    assert parse_config(WithRuns, ["a", "b", "--out", "x"]) == WithRuns(("a", "b"), "x")
    assert parse_config(WithRuns, ["--out", "x", "a"]) == WithRuns(("a",), "x")
    assert parse_config(WithRuns, []) == WithRuns()
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"runs": ["r1", "r2"]}))
    assert parse_config(WithRuns, ["--config", str(recipe)]).runs == ("r1", "r2")
    assert parse_config(WithRuns, ["--config", str(recipe), "c"]).runs == ("c",)  # words override the recipe
    assert "RUNS" in build_parser(WithRuns).format_usage()
