from __future__ import annotations

import subprocess
import sys

import pytest

from gateway import chat_cli
from kvgate.cli import SUBCOMMANDS, build_parser


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_explains_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # type: ignore[union-attr]
    for action in sub.choices[command]._actions:  # type: ignore[attr-defined]
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"
            assert action.option_strings[-1] in out


def test_chat_against_a_down_gateway_prints_one_clear_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "chat", "--gateway", "127.0.0.1:1", "hello"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "127.0.0.1:1" in lines[0] and "Traceback" not in result.stderr


def test_worker_with_unknown_gpu_profile_fails_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "worker", "--worker-id", "w", "--region", "r", "--gpu", "tpu9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "tpu9" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("-1", "must be positive (or 0 for the gateway's default)"),
        ("lots", "must be a whole number"),
        (str(2**32), "must be at most 4294967295"),
    ],
)
def test_chat_refuses_a_bad_max_tokens_before_calling_anyone(value: str, problem: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvgate.cli", "chat", "--gateway", "127.0.0.1:1", "--max-tokens", value, "hi"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--max-tokens" in result.stderr and value in result.stderr and problem in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("tell me a story", "(stopped; /history shows whether the turn was stored)"),
        ("/new", "(stopped; a new session may have been created; still in session s1)"),
        ("/history", "(stopped)"),
        ("/unknown is a message too", "(stopped; /history shows whether the turn was stored)"),
    ],
)
def test_a_stopped_command_says_what_it_may_have_left_behind(line: str, said: str) -> None:
    assert chat_cli._stopped(line, "s1") == said
