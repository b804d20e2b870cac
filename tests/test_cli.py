"""The command line's own subcommands (the zoo's are tested in test_zoo.py)."""
import json

import pytest

from trigscan import __version__
from trigscan._extension import OP_NAMES
from trigscan.cli import main


def test_info_lists_every_op_with_its_cpu_kernel(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for op in OP_NAMES:
        line = next(l for l in out.splitlines() if f"trigscan::{op} " in l)
        assert "CPU" in line.split() and "Meta" in line.split()
    assert "nc" in out and "b3d" in out


def test_info_json_is_build_info(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loaded"] is True and set(info["ops"]) == set(OP_NAMES)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"trigscan {__version__}"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
