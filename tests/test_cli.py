"""The `dreamshot` command line: one-line errors with status 2, sweep launch lines."""

from dreamshot.cli import main


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
