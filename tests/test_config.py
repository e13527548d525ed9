"""Config composition: groups, experiments, overrides, and one-line errors naming key and file."""

import subprocess
import sys
from pathlib import Path

import pytest

from dreamshot.config.load import CONF_DIR, available_experiments, load_config, load_runs, scale_phases, to_yaml
from dreamshot.config.schema import Config, PhaseConfig
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


@pytest.mark.parametrize(
    "key",
    [
        "model.transformer.num_layers",
        "model.transformer.num_attention_heads",
        "model.transformer.ffn_dim",
        "model.transformer.text_dim",
        "model.transformer.freq_dim",
        "model.transformer.in_channels",
        "model.transformer.rope_max_seq_len",
        "model.vae.base_dim",
        "model.vae.z_dim",
        "model.vae.num_res_blocks",
        "model.text_encoder.d_model",
        "model.text_encoder.d_kv",
        "model.text_encoder.d_ff",
        "model.text_encoder.num_layers",
        "model.text_encoder.num_heads",
        "model.text_encoder.vocab_size",
        "data.batch_size",
        "data.max_shots",
    ],
)
def test_sizes_and_counts_below_one_are_refused_at_load(key):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [f"{key}=0"])
    assert str(err.value) == f"{key} must be >= 1, got 0 (set on the command line)" and err.value.key == key


@pytest.mark.parametrize("key", ["data.val_groups", "data.num_workers"])
def test_negative_data_counts_are_refused_at_load(key):
    with pytest.raises(ConfigError, match=rf"^{key} must be >= 0, got -1 \(set on the command line\)$"):
        load_config("smoke", [f"{key}=-1"])


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("[]", "racl.blocks is empty: name at least one block (null: the middle half)"),
        ("[1,-1]", "racl.blocks: 1 and -1 both name block 1 of the 2-layer model"),
        ("[0,1,0]", "racl.blocks: 0 and 0 both name block 0 of the 2-layer model"),
    ],
)
def test_racl_blocks_name_each_block_once(blocks, message):
    assert load_config("smoke", ["racl.blocks=[-1,0]"]).racl_blocks() == [0, 1]
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["racl.weight=0.1", f"racl.blocks={blocks}"])
    assert str(err.value) == f"{message} (set on the command line)" and err.value.key == "racl.blocks"


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


def test_a_group_choice_a_saved_run_config_masks_whole_is_refused(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(load_config("smoke")))
    with pytest.raises(ConfigError, match=r"logger=csv: every key of conf/logger/csv.yaml is set again in .*config"):
        load_config(saved, ["logger=csv"])
    assert load_config(saved, ["logger=wandb"]).logger.backend == "wandb"  # the choice the saved config holds already
    assert load_config(saved, ["logger.backend=csv"]).logger.backend == "csv"
    assert load_config("smoke", ["logger=csv"]).logger.backend == "csv"  # an experiment leaves it to the group


def test_experiments_folder_is_not_empty():
    assert {"smoke", "demo"} <= set(available_experiments())


def test_sweep_members_are_runs_of_one_group(tmp_path):
    exp = tmp_path / "pair.yaml"
    exp.write_text("tags: [t]\nsweep:\n  a: [optim.lr=0.5]\n  b: [optim.lr=0.25, model=wan1_3b]\n")
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


def test_a_run_refuses_a_placeholder_left_unset_and_names_where_it_goes(tmp_path, monkeypatch, no_local_config):
    # data=manifest says `manifest: ???`: a run must not fall back to the toy world.
    with pytest.raises(ConfigError, match=r"data\.manifest is not set.*conf/local\.yaml") as err:
        load_config("racl_ablation", [], "with_racl", require_inputs=True)
    assert "data: {manifest: ...}" in str(err.value) and "\n" not in str(err.value)
    local = tmp_path / "local.yaml"
    local.write_text("data: {manifest: /data/sb/manifest.jsonl}\nmodel: {pretrained_path: /data/wan14b}\n")
    monkeypatch.setenv("DREAMSHOT_LOCAL_CONFIG", str(local))
    cfg = load_config("racl_ablation", [], "with_racl", require_inputs=True)
    assert cfg.data.manifest == "/data/sb/manifest.jsonl"


def test_a_full_size_model_without_weights_is_refused_unless_random_init(tmp_path, monkeypatch, no_local_config):
    data = ["data.manifest=/data/manifest.jsonl"]
    with pytest.raises(ConfigError, match=r"model\.pretrained_path is not set for the full-size model 'wan14b'"):
        load_config("dreamshot", data, require_inputs=True)
    with pytest.raises(ConfigError, match="model.pretrained_path"):
        load_config("smoke", ["model=wan1_3b"], require_inputs=True)
    # Any DiT of ~100M parameters or more counts, whatever its name.
    dims = {"num_layers": 12, "num_attention_heads": 8, "attention_head_dim": 96, "ffn_dim": 4096}
    big = [f"model.transformer.{key}={value}" for key, value in dims.items()]
    with pytest.raises(ConfigError, match="full-size model 'tiny'"):
        load_config("smoke", big, require_inputs=True)
    assert load_config("dreamshot", [*data, "model.random_init=true"], require_inputs=True).model.random_init
    assert load_config("smoke", require_inputs=True).model.name == "tiny"
    # Commands that only read a config (the planner, reports) still compose the recipe as it ships.
    assert load_config("dreamshot").data.manifest is None


def test_list_entries_can_be_overridden_by_index_and_the_run_length_follows():
    cfg = load_config("toy_reproduction", ["curriculum.0.steps=15"], "with_racl")
    assert [p.steps for p in cfg.curriculum] == [15, 300] and cfg.trainer.max_steps == 315
    assert load_config("smoke", ["data.resolution.1=96"]).data.resolution == [64, 96]
    for bad in ("curriculum.2.steps=1", "curriculum.x.steps=1"):
        with pytest.raises(ConfigError, match=r"curriculum is a list of 2, index it with 0\.\.1"):
            load_config("toy_reproduction", [bad], "with_racl")
    with pytest.raises(ConfigError, match="curriculum is an empty list"):
        load_config("smoke", ["curriculum.0.steps=1"])


def test_max_steps_on_the_command_line_scales_every_phase_by_its_share():
    cfg = load_config("toy_reproduction", ["trainer.max_steps=20"], "with_racl")
    phases = [(p.steps, p.resolution, p.use_racl) for p in cfg.curriculum]
    assert phases == [(17, [64, 112], True), (3, [96, 160], False)]
    assert cfg.trainer.max_steps == 20
    (paper,) = load_runs("dreamshot", ["data.manifest=/data/manifest.jsonl", "trainer.max_steps=20"])
    assert [p.steps for p in paper.curriculum] == [10, 10]
    with pytest.raises(ConfigError, match="trainer.max_steps=1 is shorter than the curriculum's 2 phases"):
        load_config("toy_reproduction", ["trainer.max_steps=1"], "with_racl")


def test_scaled_phases_sum_to_the_steps_and_keep_one_step_each():
    phases = [PhaseConfig(steps) for steps in (1000, 1, 1)]
    assert [p.steps for p in scale_phases(phases, 5)] == [3, 1, 1]
    assert [p.steps for p in scale_phases([PhaseConfig(1), PhaseConfig(2)], 10)] == [3, 7]


def test_every_sweep_member_gets_its_own_folder_whatever_output_dir_says():
    runs = load_runs("toy_racl_ablation", ["output_dir=/scratch/ablation"])
    assert [cfg.output_dir for cfg in runs] == ["/scratch/ablation/with_racl", "/scratch/ablation/without_racl"]
    named = load_runs("toy_racl_ablation", ["output_dir=/scratch/${name}"])
    assert [cfg.output_dir for cfg in named] == [
        "/scratch/toy_racl_ablation/with_racl",
        "/scratch/toy_racl_ablation/without_racl",
    ]
    assert load_config("toy_racl_ablation", [], "with_racl").output_dir == "outputs/toy_racl_ablation/with_racl"
    assert load_config("toy_racl_ablation", ["output_dir=/x/with_racl"], "with_racl").output_dir == "/x/with_racl"
    assert load_config("smoke", ["output_dir=/scratch/one"]).output_dir == "/scratch/one"


def test_composing_a_config_imports_no_torch():
    code = (
        "import sys; from dreamshot.config.load import load_runs; load_runs('toy_racl_ablation'); "
        "print(sorted(m for m in ('torch', 'lightning', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ("[real,sintetic]", "data.sources must be one of real, synthetic; got 'sintetic'"),
        ("[web]", "data.sources must be one of real, synthetic; got 'web'"),
        ("[]", "data.sources is empty: name one of real, synthetic at least (null: all)"),
    ],
)
def test_an_unknown_data_source_is_refused_at_load_naming_where_it_was_set(sources, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [f"data.sources={sources}"])
    assert str(err.value) == f"{message} (set on the command line)" and err.value.key == "data.sources"
    experiment = tmp_path / "sources.yaml"
    experiment.write_text(f"extends: smoke\ndata: {{sources: {sources}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(experiment)
    assert str(err.value) == f"{message} (set in {experiment})"
    assert load_config("smoke", ["data.sources=[synthetic, real]"]).data.sources == ["synthetic", "real"]


@pytest.mark.parametrize(("share", "kept", "refused"), [(0.0, "synthetic", "real"), (1.0, "real", "synthetic")])
def test_a_source_the_toy_world_never_labels_is_refused_at_load(share, kept, refused):
    overrides = [f"data.toy.real_share={share}"]
    with pytest.raises(ConfigError, match=rf"data.sources=\[{refused}\] keeps no training group") as err:
        load_config("smoke", [*overrides, f"data.sources=[{refused}]"])
    assert err.value.key == "data.sources"
    assert load_config("smoke", [*overrides, f"data.sources=[{kept},{refused}]"]).data.sources == [kept, refused]
    # A manifest's sources are its records': only reading it tells.
    manifest = ["data.manifest=/nowhere/manifest.jsonl", f"data.sources=[{refused}]"]
    assert load_config("smoke", [*overrides, *manifest]).data.sources == [refused]
    assert load_config("smoke", ["data.toy.real_share=0.5", f"data.sources=[{refused}]"]).data.sources == [refused]


@pytest.mark.parametrize(
    ("key", "in_yaml", "bad", "good", "message"),
    [
        (
            "data.toy.image_size",
            "data: {toy: {image_size: %s}}",
            "[8,160]",
            "[32,32]",
            "data.toy.image_size[0] must be >= 16, got 8",
        ),
        (
            "eval.toy.image_size",
            "eval: {toy: {image_size: %s}}",
            "[32,8]",
            "[32,32]",
            "eval.toy.image_size[1] must be >= 16, got 8",
        ),
        (
            "data.resolution",
            "data: {resolution: %s}",
            "[60,112]",
            "[32,32]",
            "data.resolution must be [height, width], positive multiples of 16; got [60, 112]",
        ),
        (
            "racl.blocks",
            "racl: {blocks: %s}",
            "[1,99]",
            "[0]",
            "racl.blocks: block 99 does not exist in a 2-layer model",
        ),
    ],
)
def test_a_bad_list_item_names_the_layer_that_set_the_list(key, in_yaml, bad, good, message, tmp_path):
    def experiment(value: str) -> Path:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(f"extends: smoke\n{in_yaml % value}\n")
        return path

    in_file = experiment(bad)
    with pytest.raises(ConfigError) as err:
        load_config(in_file)
    assert str(err.value) == f"{message} (set in {in_file})"
    # The whole list on the command line (over a file's valid one, or none) sets every item of it.
    valid = experiment(good)
    load_config(valid)
    for name in ("smoke", valid):
        with pytest.raises(ConfigError) as err:
            load_config(name, [f"{key}={bad}"])
        assert str(err.value) == f"{message} (set on the command line)"


def test_an_item_of_a_curriculum_names_the_layer_that_set_it(tmp_path):
    whole = "curriculum=[{steps: 0, resolution: [64, 112]}, {steps: 4, resolution: [64, 112]}]"
    with pytest.raises(ConfigError) as err:
        load_config("toy_dreamshot", [whole, "trainer.max_steps=4"])
    assert str(err.value) == "curriculum[0].steps must be >= 1, got 0 (set on the command line)"
    # An item set by index leaves the rest of the list to the file that set it.
    experiment = tmp_path / "phases.yaml"
    experiment.write_text(f"extends: smoke\n{whole.replace('=', ': ', 1)}\ntrainer: {{max_steps: 4}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(experiment, ["curriculum.1.resolution=[96,160]"])
    assert str(err.value) == f"curriculum[0].steps must be >= 1, got 0 (set in {experiment})"
    with pytest.raises(ConfigError) as err:
        load_config("toy_dreamshot", ["curriculum.1.resolution=[96,150]", "curriculum.0.steps=0"])
    assert str(err.value) == "curriculum[0].steps must be >= 1, got 0 (set on the command line)"
    with pytest.raises(ConfigError) as err:
        load_config("toy_dreamshot", ["curriculum.1.resolution=[96,150]"])
    message = "curriculum[1].resolution must be [height, width], positive multiples of 16; got [96, 150]"
    assert str(err.value) == f"{message} (set on the command line)"


def test_a_sweep_members_override_is_named_as_the_members_not_the_command_lines(tmp_path):
    exp = tmp_path / "pair.yaml"
    exp.write_text("extends: smoke\nsweep:\n  a: [racl.weight=-1]\n  b: [racl.weight=heavy]\n  c: [optim.lr=0.5]\n")
    with pytest.raises(ConfigError) as err:
        load_config(exp, member="a")
    assert str(err.value) == "racl.weight must be >= 0, got -1.0 (set by sweep member 'a')"
    with pytest.raises(ConfigError, match=r"^sweep member 'b': racl\.weight=heavy: .*could not be converted"):
        load_config(exp, member="b")
    with pytest.raises(ConfigError, match=r"^command line: optim\.lr=fast: "):
        load_config(exp, ["optim.lr=fast"], member="c")
    with pytest.raises(ConfigError) as err:
        load_config(exp, ["racl.weight=-2"], member="a")
    assert str(err.value) == "racl.weight must be >= 0, got -2.0 (set on the command line)"
