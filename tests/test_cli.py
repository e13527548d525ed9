"""The `dreamshot` command line: one-line errors with status 2, sweep launch lines."""

import os
import shlex
import subprocess
import sys

import pytest

from dreamshot.cli import COMMANDS, build_parser, main, parse_with_overrides
from dreamshot.config.load import load_config
from dreamshot.report.sweep import sweep_commands


def test_config_fault_is_one_line_with_status_2(capsys):
    assert main(["train", "smoke", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "optim.lrr" in err and err.startswith("dreamshot train: error:")


def test_print_commands_gives_one_line_per_sweep_member(capsys):
    assert main(["train", "toy_racl_ablation", "trainer.max_steps=200", "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "dreamshot train toy_racl_ablation trainer.max_steps=200 trainer.ckpt_path=last --member with_racl",
        "dreamshot train toy_racl_ablation trainer.max_steps=200 trainer.ckpt_path=last --member without_racl",
    ]


def test_printed_launch_lines_resume_as_the_sweeps_do(capsys):
    """A requeued cluster job runs its line again: without `trainer.ckpt_path=last` its folder would hold another
    run and the relaunch be refused. Each line is the sweep's own, and one that says how to start keeps it."""
    for overrides in ([], ["trainer.overwrite=true"], ["trainer.ckpt_path=/runs/a/checkpoints/last.ckpt"]):
        assert main(["train", "toy_racl_ablation", *overrides, "--print-commands"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines == [shlex.join(["dreamshot", *argv]) for argv in sweep_commands("toy_racl_ablation", overrides)]
        assert all(("trainer.ckpt_path=last" in line) == (not overrides) for line in lines)
    assert main(["train", "toy_dreamshot", "--print-commands"]) == 0  # a single run: one line, resuming too
    (line,) = capsys.readouterr().out.splitlines()
    assert line == "dreamshot train toy_dreamshot trainer.ckpt_path=last"
    assert load_config("toy_dreamshot", shlex.split(line)[3:]).trainer.ckpt_path == "last"


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


@pytest.mark.parametrize("command", ["cache", "train", "plan", "eval", "generate"])
def test_every_command_taking_overrides_gives_every_form_of_them_in_its_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "config overrides, anywhere on the line: key.sub=value, list.0.key=value" in text
    assert "group=option (model=wan14b)" in text


def test_overrides_are_taken_anywhere_on_the_line(capsys):
    argv = ["train", "toy_racl_ablation", "--member", "with_racl", "trainer.max_steps=200", "--print-commands"]
    argv.append("seed=3")
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == (
        "dreamshot train toy_racl_ablation trainer.max_steps=200 seed=3 trainer.ckpt_path=last --member with_racl"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "smoke", "--bogus", "seed=3"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["toyworld", "--out", "x", "seed=3"])  # a command without overrides


# Each command with its required arguments, so that an unknown option is what argparse refuses.
COMMAND_LINES = {
    "toyworld": ["--out", "x"],
    "cache": ["smoke"],
    "train": ["smoke"],
    "export": ["run", "--out", "x"],
    "plan": ["smoke"],
    "generate": ["story.yaml", "--base", "--out", "x"],
    "animate": ["storyboard", "--i2v", "wan", "--out", "clip.mp4"],
    "prepare": ["videos", "--out", "x"],
    "eval": ["toy", "--base"],
    "report": ["group"],
}


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", COMMANDS)
def test_a_usage_error_is_one_line_naming_the_command(command, capsys):
    assert set(COMMAND_LINES) == set(COMMANDS)
    unknown = _usage_error([command, *COMMAND_LINES[command], "--bogus", "x=1"], capsys)
    assert unknown.startswith(f"dreamshot {command}: error: unrecognized arguments: --bogus"), unknown
    missing = _usage_error([command, "--bogus"], capsys)  # the required arguments are missing
    assert missing.startswith(f"dreamshot {command}: error: "), missing


@pytest.mark.parametrize("command", ["cache", "train", "plan", "generate", "prepare", "eval"])
def test_a_command_taking_overrides_takes_them_anywhere_and_says_so(command):
    parser = build_parser(command)
    subcommand = next(action for action in parser._actions if action.dest == "command").choices[command]
    (overrides,) = [action for action in subcommand._actions if action.dest == "overrides"]
    args = parse_with_overrides(parser, [command, *COMMAND_LINES[command], "a.b=1"])  # after the options
    assert args.overrides == ["a.b=1"]
    assert "anywhere on the line" in overrides.help, overrides.help


def test_training_an_evaluation_time_sweep_is_refused(capsys):
    assert main(["train", "toy_guidance"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "evaluation-time experiment" in err and "make sweep SWEEP=toy_guidance CKPT=" in err


def test_print_commands_refuses_a_recipe_without_its_data_and_weights(capsys, no_local_config):
    assert main(["train", "racl_ablation", "--print-commands"]) == 2
    assert "data.manifest is not set" in capsys.readouterr().err
    assert main(["train", "racl_ablation", "data.manifest=/d/m.jsonl", "--print-commands"]) == 2
    assert "model.pretrained_path is not set" in capsys.readouterr().err
    inputs = ["data.manifest=/d/m.jsonl", "model.pretrained_path=/w"]
    assert main(["train", "racl_ablation", *inputs, "--print-commands"]) == 0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_stepz=1", ["trainer.max_stepz", "Did you mean: 'max_steps'"]),
        ("data.sources=[rael]", ["data.sources must be one of real, synthetic; got 'rael' (set on the command line)"]),
        ("model.vae.z_dim=8", ["model.transformer.in_channels (16) must equal model.vae.z_dim (8)"]),
    ],
)
def test_a_config_typo_is_reported_before_torch_is_imported(override, expected):
    code = (
        f"import sys; from dreamshot.cli import main; status = main(['train', 'smoke', '{override}']); "
        "print(status, 'torch' in sys.modules, 'lightning' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "2 False False"
    assert result.stderr.count("\n") == 1 and all(text in result.stderr for text in expected)


def test_python_dash_m_dreamshot_is_the_command_line():
    """`python -m dreamshot` runs the CLI, its errors one line with status 2 as the `dreamshot` script's."""
    done = subprocess.run(
        [sys.executable, "-m", "dreamshot", "train", "smoke", "optim.lrr=1"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("dreamshot train: error:") and "optim.lrr" in done.stderr


@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
@pytest.mark.parametrize(
    "argv",
    [["-m", "dreamshot", "train"], ["-m", "dreamshot.report.sweep"]],
    ids=["dreamshot", "sweep"],
)
def test_a_reader_that_closes_early_ends_a_printing_command_quietly(argv, buffered):
    """`... --print-commands | head`: the reader is gone before the lines are written (its end of the pipe closed
    before the command prints), and the command ends with SIGPIPE's shell status, no traceback, whether the lines
    fail as printed (unbuffered) or only at the last flush (buffered)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, *argv, "toy_racl_ablation", "--print-commands"]
    try:
        done = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.slow
def test_a_printed_launch_line_run_again_resumes_its_run(tmp_path, capsys):
    """The requeued job: the printed line, run a second time in the folder the first one trained, resumes (and
    trains no further) instead of being refused as a folder holding another run."""
    tiny = [
        "curriculum=[]",
        "trainer.max_steps=2",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.val_check_interval=2",
    ]
    tiny += ["data.toy.groups=3", "data.val_groups=1", "data.resolution=[32,48]", "data.toy.image_size=[32,48]"]
    tiny += ["logger.backend=csv", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", "toy_dreamshot", *tiny, "--print-commands"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    argv = shlex.split(line)[1:]
    assert main(argv) == 0
    lora = (tmp_path / "run" / "lora.safetensors").read_bytes()
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "lora.safetensors").read_bytes() == lora
