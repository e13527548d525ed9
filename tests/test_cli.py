"""The `dreamshot` command line: one-line errors with status 2, sweep launch lines."""

import subprocess
import sys

import pytest

from dreamshot.cli import COMMANDS, main


def test_config_fault_is_one_line_with_status_2(capsys):
    assert main(["train", "smoke", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "optim.lrr" in err and err.startswith("dreamshot train: error:")


def test_print_commands_gives_one_line_per_sweep_member(capsys):
    assert main(["train", "toy_racl_ablation", "trainer.max_steps=200", "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "dreamshot train toy_racl_ablation trainer.max_steps=200 --member with_racl",
        "dreamshot train toy_racl_ablation trainer.max_steps=200 --member without_racl",
    ]


def test_a_command_imports_only_its_own_module():
    """`dreamshot plan` must run where PyAV, OpenCV or imageio-ffmpeg (other commands' dependencies) are absent."""
    code = (
        "import sys; from dreamshot.cli import main; main(['plan', 'smoke']); "
        "print(sorted(m for m in sys.modules if m.startswith('dreamshot.commands.') or m in ('av', 'cv2')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "['dreamshot.commands.plan']"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
