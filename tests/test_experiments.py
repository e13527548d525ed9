"""Every shipped experiment (and every member of a sweep) composes, validates and builds."""

import pytest

from dreamshot.config.load import available_experiments, load_runs
from dreamshot.diffusion.conditioning import MODES, trained_modes
from dreamshot.models.wan.role_capture import RoleCaptureSelfAttnProcessor
from dreamshot.planner.shape import model_shape
from dreamshot.training.module import DreamShotModule

# Experiments on real data need a manifest path to compose; nothing is read at build time.
DATA = ["data.manifest=/data/storyboards/manifest.jsonl"]
# Sweep members mostly share a model: its meta-device shape is built once per distinct model config.
_SHAPES = {}


def _shape(model):
    key = repr(model)
    if key not in _SHAPES:
        _SHAPES[key] = model_shape(model, count_encoders=False)
    return _SHAPES[key]


@pytest.mark.parametrize("experiment", available_experiments())
def test_experiment_builds(experiment):
    runs = load_runs(experiment, DATA)
    assert runs and len({cfg.name for cfg in runs}) == len(runs)
    for cfg in runs:
        assert cfg.tags, f"{experiment}: every experiment is tagged"
        if cfg.model.name == "tiny":
            module = DreamShotModule(cfg)
            blocks = module.adapter.transformer.blocks
            captured = [i for i, b in enumerate(blocks) if isinstance(b.attn1.processor, RoleCaptureSelfAttnProcessor)]
            assert captured == cfg.racl_blocks()
        else:
            shape = _shape(cfg.model)
            assert shape.dit_params > 1e9 and shape.lora_params > 0


def test_paper_recipe_and_its_ablations():
    (paper,) = load_runs("dreamshot", DATA)
    assert paper.model.name == "wan14b" and paper.model.lora.rank == 256 and paper.optim.lr == 1e-4
    assert [(p.steps, p.resolution) for p in paper.phases()] == [(10000, [192, 336]), (10000, [480, 832])]
    assert paper.racl_weight(0) > 0 and paper.racl_weight(1) == 0
    # The recipe trains every condition set inference builds (re-rolls of r2s storyboards: references and shots).
    assert trained_modes(paper.storyboard) == set(MODES) and paper.storyboard.modes.r2s_s2s > 0
    with_racl, without = load_runs("racl_ablation", DATA)
    assert with_racl.logger.group == without.logger.group == "racl_ablation"
    assert with_racl.racl.weight > 0 and without.racl.weight == 0
    for layout in ("phase", "neg", "last"):
        (cfg,) = load_runs(f"pos_{layout}", DATA)
        assert cfg.storyboard.layout == layout
        # The ablation changes only the layout.
        cfg.storyboard.layout = paper.storyboard.layout
        cfg.name, cfg.tags, cfg.output_dir = paper.name, paper.tags, paper.output_dir
        assert cfg == paper
