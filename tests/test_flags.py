"""Every count, size and rate flag of every entry point is range-checked where it is parsed: an out-of-range or
malformed value ends in argparse's one-line error (exit 2), never in a traceback later (`--batch_size 0` once
ended in a ZeroDivisionError)."""
import argparse
import importlib
import subprocess
import sys

import pytest
import torch

from common import REPO_ROOT, device_flag
from trainer.config import STAGE_DEFAULTS, build_parser

# (module, function that builds or parses with the entry point's parser)
ENTRY_POINTS = [
    ("eval_vlm", "parse_args"),
    ("web_demo_vlm", "build_parser"),
    ("dev.bench", "parse_args"),
    ("scripts.check_data", "parse_args"),
    ("scripts.convert_vlm", "parse_args"),
    ("scripts.demo", "parse_args"),
    ("scripts.download", "parse_args"),
    ("dev.make_assets", "parse_args"),
    ("scripts.serve_openai_api", "parse_args"),
    ("dev.bench_serve", "parse_args"),
    ("dev.bench_data", "parse_args"),
    ("scripts.eval_bench", "build_parser"),
    ("scripts.gpu_check", "parse_args"),
]


class Captured(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def parser_of(module_name, function_name, monkeypatch) -> argparse.ArgumentParser:
    """The ArgumentParser an entry point builds, caught when it starts parsing (nothing else runs)."""
    function = getattr(importlib.import_module(module_name), function_name)

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        try:
            result = function([]) if function_name == "parse_args" else function()
        except Captured as captured:
            return captured.parser
    assert isinstance(result, argparse.ArgumentParser), f"{module_name}.{function_name} gave no parser"
    return result


def all_parsers(monkeypatch):
    parsers = {f"train ({stage})": build_parser(None, **defaults) for stage, defaults in STAGE_DEFAULTS.items()}
    for module_name, function_name in ENTRY_POINTS:
        parsers[module_name] = parser_of(module_name, function_name, monkeypatch)
    return parsers


def numeric_options(parser):
    """(option string, type) of each option that parses a number without a fixed list of choices."""
    for action in parser._actions:
        if action.option_strings and action.choices is None and action.type is not None:
            kind = getattr(action.type, "kind", action.type)
            if kind in (int, float):
                yield action.option_strings[0], action.type


def out_of_range_values(parse) -> list:
    values = ["not-a-number"]
    if parse.low is not None:
        values.append(str(parse.low if parse.low_open else parse.low - 1))
    if parse.high is not None:
        values.append(str(parse.high + 1))
    if parse.kind is float:
        values.append("nan")
    return values


def test_every_numeric_flag_has_a_range(monkeypatch):
    unchecked = [f"{name} {option}" for name, parser in all_parsers(monkeypatch).items()
                 for option, parse in numeric_options(parser) if not hasattr(parse, "low")]
    assert unchecked == []


def test_out_of_range_values_end_in_one_argparse_line(monkeypatch, capsys):
    checked = 0
    for name, parser in all_parsers(monkeypatch).items():
        # argparse names a flag with an alias by all its spellings: "--max_total_tokens/--max_seq_len"
        spellings = {action.option_strings[0]: "/".join(action.option_strings) for action in parser._actions
                     if action.option_strings}
        for option, parse in numeric_options(parser):
            for value in out_of_range_values(parse):
                with pytest.raises(SystemExit) as stop:
                    parser.parse_args([option, value])
                error = capsys.readouterr().err.strip().splitlines()[-1]
                assert stop.value.code == 2, (name, option, value)
                assert error.endswith(f"argument {spellings[option]}: must be " + error.split(": must be ", 1)[1]), \
                    error
                assert value in error and "Traceback" not in error, (name, option, value, error)
                checked += 1
    assert checked > 100  # every entry point took part


def test_batch_size_zero_is_refused_by_the_trainer(capsys):
    parser = build_parser(None, **STAGE_DEFAULTS["sft"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch_size", "0"])
    assert "argument --batch_size: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_an_entry_point_started_as_a_file_says_in_one_line_how_to_run_it(tmp_path):
    """`python scripts/NAME.py` (upstream's README habit) cannot import the project: it names the command that can."""
    files = [path for folder in ("scripts", "dev") for path in sorted((REPO_ROOT / folder).glob("*.py"))
             if "__main__" in path.read_text(encoding="utf-8")]
    assert len(files) >= 10
    for path in files:
        result = subprocess.run([sys.executable, str(path), "--help"], cwd=tmp_path, capture_output=True, text=True)
        module = f"{path.parent.name}.{path.stem}"
        assert (result.returncode, result.stdout) == (1, ""), path
        assert result.stderr == f"run it from the repository root as: python -m {module}\n", path


def test_upstreams_max_seq_len_flag_still_sets_the_prompt_and_answer_budget():
    """Inference's budget is --max_total_tokens (the trainer's --max_seq_len is the training cut); upstream's eval
    commands pass --max_seq_len, which stays an alias."""
    import eval_vlm

    assert eval_vlm.parse_args(["--max_seq_len", "3000"]).max_total_tokens == 3000
    assert eval_vlm.parse_args(["--max_total_tokens", "4000"]).max_total_tokens == 4000


def device_parsers(monkeypatch) -> dict:
    return {name: parser for name, parser in all_parsers(monkeypatch).items()
            if any("--device" in action.option_strings for action in parser._actions)}


def test_every_device_flag_names_a_device_this_machine_has(monkeypatch, capsys):
    """A device torch does not know, or CUDA on a machine without it, ends in argparse's one line (exit 2) that
    says what to give, not in torch's traceback at the first tensor moved."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    parsers = device_parsers(monkeypatch)
    assert len(parsers) >= 9  # both trainers, eval, web demo, API server, benchmarks, demo, GPU check
    for name, parser in parsers.items():
        for value, expected in (("gpu0", "'gpu0' is not a device: give cpu, cuda, cuda:N or mps"),
                                ("cuda", "cuda: torch " + torch.__version__ + " sees no CUDA GPU on this machine")):
            with pytest.raises(SystemExit) as stop:
                parser.parse_args(["--device", value])
            error = capsys.readouterr().err.strip().splitlines()[-1]
            assert stop.value.code == 2 and f"argument --device: {expected}" in error, (name, error)
        device = next(action for action in parser._actions if "--device" in action.option_strings)
        assert device.type("cpu") == "cpu" and device.default == "cpu", name  # no CUDA here: the default is the CPU


def test_a_cuda_index_must_be_one_of_the_gpus_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [device_flag(value) for value in ("cuda", "cuda:0", "cuda:1", "cpu")] == ["cuda", "cuda:0", "cuda:1", "cpu"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"^cuda:2: torch sees 2 CUDA GPU\(s\), cuda:0 to cuda:1$"):
        device_flag("cuda:2")
