"""Config composition: groups, experiments, overrides, and one-line errors naming key and file."""

import pytest

from dreamshot.config.load import CONF_DIR, available_experiments, load_config, to_yaml
from dreamshot.config.schema import Config
from dreamshot.utils.errors import ConfigError


def test_defaults_compose_to_tiny_model():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.name == "tiny" and cfg.trainer.accelerator == "cpu" and cfg.logger.backend == "wandb"


def test_experiment_name_tags_and_override_order():
    cfg = load_config("smoke", ["trainer.max_steps=7", "model=wan14b"])
    assert cfg.name == "smoke" and "smoke" in cfg.tags
    assert cfg.trainer.max_steps == 7  # command line beats the experiment (4)
    assert cfg.model.transformer.num_layers == 40
    assert cfg.output_dir == "outputs/smoke"


def test_experiment_extends_and_groups(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("groups: {logger: csv}\noptim: {lr: 0.5}\ntrainer: {max_steps: 3}\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {base}\ntrainer: {{max_steps: 9}}\n")
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.logger.backend == "csv"
    assert cfg.optim.lr == 0.5 and cfg.trainer.max_steps == 9


def test_local_overrides_file_is_merged(tmp_path, monkeypatch):
    local = tmp_path / "local.yaml"
    local.write_text("model: {pretrained_path: /weights/wan}\n")
    monkeypatch.setenv("DREAMSHOT_LOCAL_CONFIG", str(local))
    assert load_config("smoke").model.pretrained_path == "/weights/wan"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["optim.lr=fast"], "optim.lr"),
        (["model=wan15b"], "wan15b"),
        (["trainer.max_steps"], "key=value"),
        (["data.resolution=[60,112]"], "data.resolution"),
        (["storyboard.layout=sideways"], "storyboard.layout"),
        (["storyboard.modes.t2s=0.9"], "storyboard.modes"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_unknown_key_in_experiment_file_names_file_and_key(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("trainer:\n  max_stpes: 3\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*max_stpes"):
        load_config(bad)


def test_unknown_experiment_lists_available():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("no_such_experiment")


def test_every_group_file_composes():
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            overrides = [f"{group_dir.name}={option.stem}"]
            if option.read_text().count("???"):
                overrides.append("data.manifest=/data/manifest.jsonl")
            cfg = load_config(None, overrides)
            assert cfg is not None


def test_yaml_round_trip_is_loadable(tmp_path):
    cfg = load_config("smoke")
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg


def test_experiments_folder_is_not_empty():
    assert {"smoke", "demo"} <= set(available_experiments())


def test_sweep_members_are_runs_of_one_group(tmp_path):
    exp = tmp_path / "pair.yaml"
    exp.write_text("tags: [t]\nsweep:\n  a: [optim.lr=0.5]\n  b: [optim.lr=0.25, model=wan1_3b]\n")
    from dreamshot.config.load import load_runs

    a, b = load_runs(exp, ["trainer.max_steps=3"])
    assert (a.name, b.name) == ("pair/a", "pair/b") and a.logger.group == b.logger.group == "pair"
    assert (a.optim.lr, b.optim.lr) == (0.5, 0.25) and b.model.name == "wan1_3b"
    assert a.tags == ["t", "a"] and a.trainer.max_steps == b.trainer.max_steps == 3
    assert load_config(exp, ["optim.lr=1.0"], member="a").optim.lr == 1.0  # the command line wins
    with pytest.raises(ConfigError, match="sweep of a, b"):
        load_config(exp)


def test_malformed_sweep_is_an_error(tmp_path):
    exp = tmp_path / "bad.yaml"
    exp.write_text("sweep:\n  a: optim.lr=0.5\n")
    with pytest.raises(ConfigError, match="bad.yaml.*list of key=value"):
        load_config(exp, member="a")
