"""Compose a run's config: schema defaults, base groups, an experiment file, command-line overrides.

Order (later wins):
  1. `Config` dataclass defaults;
  2. one file per base group, `conf/<group>/<option>.yaml`, options chosen by `conf/defaults.yaml`, then by
     the experiment's `groups:` and by `group=option` on the command line;
  3. the experiment, `experiments/<name>.yaml` (after the experiment it `extends:`, if any);
  4. the machine's local overrides, `conf/local.yaml` (git-ignored; another file via $DREAMSHOT_LOCAL_CONFIG),
     where weight paths and cluster settings belong;
  5. `key.sub=value` overrides from the command line.
Every merge is checked against the schema, so an unknown key or a wrong type fails naming the key and the file;
a value `Config.validate` refuses is named with the layer that set it (a file, a sweep member's override, the
command line; a whole list, as `racl.blocks=[1,99]`, sets each of its items).
A `group=option` whose every key a later layer sets again (a run's saved config.yaml sets them all) would change
nothing and is refused; `key.sub=value` overrides reach any config.

Overrides (a sweep member's, then the command line's) may index into lists: `curriculum.0.steps=15`. On a
curriculum, the overrides decide the run's length: a `trainer.max_steps` among them scales every phase to it
(each phase keeps its share of the steps, at least one; `fit_curriculum`), and a curriculum changed without a
`trainer.max_steps` sets it to the new total. In the files themselves the two must agree.

An experiment may define a `sweep:` — named members, each a list of `key=value` overrides. Its runs share the
experiment's W&B group; member m is named `<experiment>/<m>`, tagged with m, and writes into
`<output_dir>/<m>` unless output_dir names it already (`${name}`, as the default `outputs/${name}` =
`outputs/<experiment>/<m>` does, or a last folder called m), so members never share a folder. `load_runs`
gives every member's config, `load_config(..., member=m)` one of them.

A config can be composed for a command that only reads it (`dreamshot plan`, reports) with placeholders
(`???`, e.g. `data.manifest` of `data=manifest`) left unset and no weights; a command that trains asks for
`require_inputs=True`, which refuses both (`Composition.require_inputs`); `compose` gives the config with the
placeholders it left unset, for a caller that decides from the config whether to refuse them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreamshot.config.schema import Config, ModelConfig, PhaseConfig
from dreamshot.utils.errors import ConfigError
from dreamshot.utils.text import read_yaml_file

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
EXPERIMENTS_DIR = REPO_ROOT / "experiments"
GROUPS = ("model", "data", "trainer", "logger")
# Keys of an experiment file that steer composition rather than set config values.
_META_KEYS = ("extends", "groups", "sweep")
# Experiments tagged so train nothing: their members score a trained run (`dreamshot.report.sweep`).
EVAL_TIME_TAG = "eval_time"
# Shipped model options that are full-size Wan checkpoints, and the DiT size (parameters, roughly) above which any
# other model counts as one: without model.pretrained_path it would train from random weights for hours.
FULL_SIZE_MODELS = ("wan1_3b", "wan14b")
FULL_SIZE_PARAMETERS = 100e6


def available_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_runs(experiment: str | Path, overrides: list[str] | None = None, require_inputs: bool = False) -> list[Config]:
    """The configs of an experiment's runs: one, or one per sweep member (`require_inputs`: see `load_config`)."""
    members = sweep_members(experiment)
    if not members:
        return [load_config(experiment, overrides, require_inputs=require_inputs)]
    return [load_config(experiment, overrides, member, require_inputs) for member in members]


def sweep_members(experiment: str | Path) -> dict[str, list[str]]:
    """An experiment's sweep (member name -> overrides); empty when it is a single run."""
    for path, body in reversed(_experiment_chain(experiment)):
        if "sweep" in body:
            return _sweep_of(body["sweep"], path)
    return {}


def load_config(
    experiment: str | Path | None = None,
    overrides: list[str] | None = None,
    member: str | None = None,
    require_inputs: bool = False,
) -> Config:
    """The typed, validated config of an experiment (a name in `experiments/` or a yaml path).

    For a sweep experiment, `member` names the run (its overrides apply before the command line's).
    `require_inputs`: the config is for a run that reads data and weights (`Composition.require_inputs`).
    """
    return compose(experiment, overrides, member, require_inputs).config


@dataclass(frozen=True)
class Composition:
    """A composed config and its placeholders (`???`) that no layer set; `config` holds their schema defaults."""

    config: Config
    unset: tuple[str, ...]

    def require_inputs(self) -> None:
        """Refuse the config for a run that reads data and weights: a placeholder left unset (`raise_unset`), a
        full-size model without its weights (`check_weights`)."""
        if self.unset:
            raise_unset(self.unset[0])
        check_weights(self.config.model)


def compose(
    experiment: str | Path | None = None,
    overrides: list[str] | None = None,
    member: str | None = None,
    require_inputs: bool = False,
) -> Composition:
    """`load_config`, keeping the unset placeholders: a caller that learns from the config itself whether the run
    needs its inputs (`dreamshot.report.sweep`) checks them afterwards without composing it again."""
    members = sweep_members(experiment) if experiment else {}
    if members and member not in members:
        raise ConfigError(
            f"experiment {Path(str(experiment)).stem!r} is a sweep of {', '.join(members)}; "
            f"{'pick one of them' if member is None else f'it has no member {member!r}'}"
        )
    member_choices, member_dotlist = _split_overrides(members[member] if members else [])
    group_choices, dotlist = _split_overrides(overrides or [])
    group_choices = {**member_choices, **group_choices}
    chain = _experiment_chain(experiment) if experiment else []
    groups = read_yaml(CONF_DIR / "defaults.yaml").get("groups", {})
    for path, body in chain:
        groups.update(_groups_of(body, path))
    groups.update(group_choices)

    cfg = OmegaConf.structured(Config)
    if chain:
        cfg.name = chain[-1][0].stem
    # (where, what it set) of every merge, so a bad value is reported with the file that set it.
    sources: list[tuple[str, Any]] = []

    def merge(update: Any, source: Path | str) -> DictConfig:
        sources.append((str(source), update))
        return merge_layer(cfg, update, source)

    for group, option in groups.items():
        cfg = merge({group: read_yaml(_group_file(group, option))}, _group_file(group, option))
    for path, body in chain:
        cfg = merge({k: v for k, v in body.items() if k not in _META_KEYS}, path)
    local = local_config()
    if local is not None:
        cfg = merge(read_yaml(local), local)
    if members:
        stem = chain[-1][0].stem
        sweep = {"name": f"{stem}/{member}", "tags": [*cfg.tags, member], "logger": {"group": stem}}
        cfg = merge(sweep, f"sweep member {member!r}")
    _check_group_choices(group_choices, sources, cfg)
    for source, items in ((f"sweep member {member!r}", member_dotlist), ("command line", dotlist)):
        cfg = apply_overrides(cfg, items, source)
        sources.append((source, _override_tree(items)))
    output_dir = cfg._get_node("output_dir")._value()  # unresolved: does it name the run (`${name}`)?
    if members and "${name}" not in output_dir and Path(output_dir).name != member:
        cfg.output_dir = f"{output_dir}/{member}"
    unset = sorted(OmegaConf.missing_keys(cfg))
    if require_inputs and unset:  # before the value checks, which would judge the schema default in its place
        raise_unset(unset[0])
    defaults = OmegaConf.structured(Config)
    for key in unset:  # a command that only reads the config sees the schema default
        OmegaConf.update(cfg, key, OmegaConf.select(defaults, key))
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {describe_error(e)}") from None
    overridden = {item.split("=", 1)[0] for item in [*member_dotlist, *dotlist]}
    fit_curriculum(config, "trainer.max_steps" in overridden, any(_under("curriculum", k) for k in overridden))
    try:
        config.validate()
    except ConfigError as e:
        origin = _origin(sources, e.key) if e.key else None
        if origin is None:
            raise
        raise ConfigError(f"{e} (set {origin})", e.key) from None
    composition = Composition(config, tuple(unset))
    if require_inputs:
        composition.require_inputs()
    return composition


def apply_overrides(cfg: DictConfig, dotlist: list[str], source: str = "command line") -> DictConfig:
    """Apply `key=value` overrides in order (values read as yaml); a key may index a list (`curriculum.0.steps`).
    `source` names where they come from in an error ("command line", "sweep member 'a'")."""
    for item in dotlist:
        key = item.split("=", 1)[0]
        _check_indices(cfg, key, source)
        try:
            if _replaces_mapping(cfg, item):
                # A free-form mapping (`inference.cache_options`) is set whole: merged, the options of the cache
                # hook a run's config chose would stay beside those of the one the command line picks.
                OmegaConf.update(cfg, key, yaml.safe_load(item.split("=", 1)[1]), merge=False)
                continue
            cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {item}: {describe_error(e)}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: {item}: the value is not valid yaml ({str(e).splitlines()[0]})") from None
    return cfg


def _replaces_mapping(cfg: DictConfig, item: str) -> bool:
    """`key=value` sets a mapping on a free-form dict of the schema (not a structured section)."""
    key, value = item.split("=", 1)
    node = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    return OmegaConf.is_dict(node) and OmegaConf.get_type(node) is dict and isinstance(yaml.safe_load(value), dict)


def _check_indices(cfg: DictConfig, key: str, source: str) -> None:
    """Every list index in the dotted `key` is a number within its list (omegaconf's own errors do not say so)."""
    node, path = cfg, []
    for part in key.split("."):
        if OmegaConf.is_list(node):
            if not part.isdigit() or int(part) >= len(node):
                where = ".".join(path)
                raise ConfigError(
                    f"{source}: {key}: {where} is a list of {len(node)}, index it with 0..{len(node) - 1}"
                    if len(node)
                    else f"{source}: {key}: {where} is an empty list; set it whole ({where}=[...])"
                )
            node = node[int(part)]
        elif OmegaConf.is_dict(node) and part in node:
            node = node._get_node(part)  # no interpolation is resolved while walking
        else:
            return  # an unknown key: the merge names it
        path.append(part)


def _under(section: str, key: str) -> bool:
    return key == section or key.startswith(f"{section}.")


def fit_curriculum(config: Config, max_steps_given: bool, curriculum_given: bool) -> None:
    """Make `trainer.max_steps` and the curriculum agree when the overrides changed one of them (in place).

    A given `trainer.max_steps` scales the phases to it; a curriculum changed without it sets `trainer.max_steps`
    to the curriculum's total. Otherwise (or with a phase of fewer than one step) nothing changes, and
    `Config.validate` refuses a mismatch.
    """
    phases = config.curriculum
    if not phases or any(phase.steps < 1 for phase in phases):
        return
    if max_steps_given:
        config.curriculum = scale_phases(phases, config.trainer.max_steps)
    elif curriculum_given:
        config.trainer.max_steps = sum(phase.steps for phase in phases)


def scale_phases(phases: list[PhaseConfig], total: int) -> list[PhaseConfig]:
    """The phases with their steps rescaled to sum to `total`: each keeps its share (rounded down, the steps left
    go to the phases that lost the most), and at least one step."""
    if total < len(phases):
        raise ConfigError(f"trainer.max_steps={total} is shorter than the curriculum's {len(phases)} phases")
    old = sum(phase.steps for phase in phases)
    exact = [phase.steps * total / old for phase in phases]
    steps = [max(1, math.floor(share)) for share in exact]
    while sum(steps) != total:
        if sum(steps) < total:
            i = max(range(len(steps)), key=lambda j: exact[j] - steps[j])
            steps[i] += 1
        else:  # the one-step floor took more than the shares allow: take from the longest phase
            steps[max(range(len(steps)), key=lambda j: steps[j])] -= 1
    return [PhaseConfig(n, list(phase.resolution), phase.use_racl) for phase, n in zip(phases, steps, strict=True)]


def describe_curriculum(config: Config) -> str:
    """One line: the run's steps and, per phase, steps, resolution and loss (printed when a run starts)."""
    phases = config.phases()
    parts = []
    for i, phase in enumerate(phases):
        weight = config.racl_weight(i)
        loss = f"L_FM + {weight:g}·L_RACL" if weight > 0 else "L_FM"
        height, width = phase.resolution
        parts.append(f"phase {i + 1}: {phase.steps} step{'s' * (phase.steps != 1)} at {height}x{width}, {loss}")
    rule = " (trainer.max_steps, split by the phases' shares)" if config.curriculum else ""
    return f"{config.trainer.max_steps} steps{rule}; " + "; ".join(parts)


def raise_unset(key: str) -> None:
    """A placeholder (`???`) that no layer set, for a run that needs it."""
    raise ConfigError(
        f"{key} is not set (the config leaves it to you, `???`): pass {key}=... on the command line, "
        f"or put `{_nested_yaml(key, '...')}` in conf/local.yaml"
    )


def check_weights(model: ModelConfig) -> None:
    """A full-size model needs its weights: `model.pretrained_path`, or `model.random_init=true` on purpose."""
    if model.pretrained_path is not None or model.random_init or not is_full_size(model):
        return
    raise ConfigError(
        f"model.pretrained_path is not set for the full-size model {model.name!r} (~{dit_parameters(model) / 1e9:.1f}B "
        "DiT parameters): point it at a local diffusers-format Wan2.1 folder, e.g. "
        f"`{_nested_yaml('model.pretrained_path', '/data/Wan2.1-T2V-14B-Diffusers')}` in conf/local.yaml "
        "(model.random_init=true trains random weights on purpose)"
    )


def is_full_size(model: ModelConfig) -> bool:
    return model.name in FULL_SIZE_MODELS or dit_parameters(model) >= FULL_SIZE_PARAMETERS


def dit_parameters(model: ModelConfig) -> float:
    """Rough DiT size from its dimensions: per block, self- and cross-attention (8·d²) and the FFN (2·d·ffn).
    The planner counts exactly (`dreamshot plan`), but builds the model; this needs no torch."""
    t = model.transformer
    dim = t.num_attention_heads * t.attention_head_dim
    return t.num_layers * (8 * dim * dim + 2 * dim * t.ffn_dim)


def _nested_yaml(key: str, value: str) -> str:
    """`a.b` -> `a: {b: value}` (how the key is written in a yaml file)."""
    parts = key.split(".")
    text = f"{parts[-1]}: {value}"
    for part in reversed(parts[:-1]):
        text = f"{part}: {{{text}}}"
    return text


def is_eval_time(config: Config) -> bool:
    """An evaluation-time experiment: its members score a trained run and train nothing."""
    return EVAL_TIME_TAG in config.tags


def _origin(sources: list[tuple[str, Any]], key: str) -> str | None:
    """Where the last of `sources` to set `key` ("optim.betas", "curriculum[0].steps") is ("in FILE", "on the
    command line", "by sweep member 'a'"); None for a schema default."""
    parts = [part for part in re.split(r"[.\[\]]+", key) if part]
    for source, update in reversed(sources):
        node = OmegaConf.to_container(update) if isinstance(update, DictConfig) else update
        for part in parts:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                break
        else:
            if source == "command line":
                return "on the command line"
            return f"by {source}" if source.startswith("sweep member") else f"in {source}"
    return None


def local_config() -> Path | None:
    """`$DREAMSHOT_LOCAL_CONFIG` (which must then exist), else `conf/local.yaml` when there is one."""
    named = os.environ.get("DREAMSHOT_LOCAL_CONFIG")
    if named:
        return Path(named)
    default = CONF_DIR / "local.yaml"
    return default if default.exists() else None


def _check_group_choices(choices: dict[str, str], sources: list[tuple[str, Any]], cfg: DictConfig) -> None:
    """Refuse a `group=option` override that a later layer masks whole: a run's saved config.yaml (or any file
    after the group files) that sets every key of the option's file would otherwise drop the choice silently."""
    for group, option in choices.items():
        path = _group_file(group, option)
        values = _leaves({group: read_yaml(path)})
        masking = {key: _origin(sources, key) for key in values}
        if not values or any(origin == f"in {path}" for origin in masking.values()):
            continue
        changed = [key for key, value in values.items() if OmegaConf.select(cfg, key) != value]
        if changed:
            key = changed[0]
            raise ConfigError(
                f"{group}={option}: every key of {path.relative_to(REPO_ROOT)} is set again {masking[key]}, so the "
                f"choice would change nothing; set the keys you mean instead (e.g. {key}={values[key]})"
            )


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as its dotted leaf keys (lists are leaves)."""
    leaves: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            leaves.update(_leaves(value, f"{key}."))
        else:
            leaves[key] = value
    return leaves


def _override_tree(dotlist: list[str]) -> dict[str, Any]:
    """`key=value` overrides as the nested mapping they set, for `_origin`: a dotted key (`curriculum.0.steps`)
    nests, its value is read as yaml, so a whole list or mapping (`racl.blocks=[1,99]`) sets every item of it."""
    tree: dict[str, Any] = {}
    for item in dotlist:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            if not isinstance(node.get(part, {}), dict):
                break  # an earlier override set this whole value already
            node = node.setdefault(part, {})
        else:
            node[leaf] = yaml.safe_load(value)
    return tree


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """`model=wan14b` picks a group option; `a.b=c` (or any non-group key) sets a value."""
    groups, dotlist = {}, []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key in GROUPS:
            _group_file(key, value)
            groups[key] = value
        else:
            dotlist.append(item)
    return groups, dotlist


def _experiment_chain(experiment: str | Path) -> list[tuple[Path, dict]]:
    """The experiment file and the ones it extends, base first."""
    chain: list[tuple[Path, dict]] = []
    path = _experiment_file(experiment)
    while path is not None:
        if any(path == seen for seen, _ in chain):
            raise ConfigError(f"{path}: 'extends' forms a cycle")
        body = read_yaml(path)
        chain.insert(0, (path, body))
        parent = body.get("extends")
        path = _experiment_file(parent) if parent else None
    return chain


def _experiment_file(experiment: str | Path) -> Path:
    path = Path(experiment)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path.resolve()
    path = EXPERIMENTS_DIR / f"{experiment}.yaml"
    if not path.exists():
        raise ConfigError(
            f"experiment {str(experiment)!r} not found in {EXPERIMENTS_DIR}; "
            f"available: {', '.join(available_experiments())}"
        )
    return path


def _group_file(group: str, option: str) -> Path:
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.exists():
        raise ConfigError(f"no option {option!r} for group {group!r}; available: {', '.join(group_options(group))}")
    return path


def _groups_of(body: dict, path: Path) -> dict[str, str]:
    groups = body.get("groups") or {}
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ConfigError(f"{path}: unknown group {sorted(unknown)[0]!r} under 'groups' (groups: {', '.join(GROUPS)})")
    for group, option in groups.items():
        _group_file(group, option)
    return dict(groups)


def _sweep_of(sweep: Any, path: Path) -> dict[str, list[str]]:
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError(f"{path}: 'sweep' must map member names to lists of key=value overrides")
    for member, items in sweep.items():
        if not isinstance(items, list) or not all(isinstance(i, str) and "=" in i for i in items):
            raise ConfigError(f"{path}: sweep member {member!r} must be a list of key=value strings")
    return {str(member): list(items) for member, items in sweep.items()}


def read_yaml(path: Path) -> dict[str, Any]:
    body = read_yaml_file(path, "config file", ConfigError) or {}
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return body


def merge_layer(cfg: DictConfig, body: dict[str, Any], source: Path) -> DictConfig:
    """Merge one yaml file; its `???` placeholders unset their keys (omegaconf's merge would keep the value
    below), so a value the user must give stays visibly missing until a later layer gives it."""
    cfg = merge_checked(cfg, body, source)
    for key in OmegaConf.missing_keys(OmegaConf.create(body)):
        OmegaConf.update(cfg, key, "???")
    return cfg


def merge_checked(cfg: DictConfig, update: Any, source: Path | str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, update)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {describe_error(e)}") from None


def describe_error(e: OmegaConfBaseException) -> str:
    message = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{message} (key: {key})" if key and key not in message else message
