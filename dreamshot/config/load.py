"""Compose a run's config: schema defaults, base groups, an experiment file, command-line overrides.

Order (later wins):
  1. `Config` dataclass defaults;
  2. one file per base group, `conf/<group>/<option>.yaml`, options chosen by `conf/defaults.yaml`, then by
     the experiment's `groups:` and by `group=option` on the command line;
  3. the experiment, `experiments/<name>.yaml` (after the experiment it `extends:`, if any);
  4. the machine's local overrides, `conf/local.yaml` (git-ignored; another file via $DREAMSHOT_LOCAL_CONFIG),
     where weight paths and cluster settings belong;
  5. `key.sub=value` overrides from the command line.
Every merge is checked against the schema, so an unknown key or a wrong type fails naming the key and the file.

An experiment may define a `sweep:` — named members, each a list of `key=value` overrides. Its runs share the
experiment's W&B group; member m is named `<experiment>/<m>` and tagged with m. `load_runs` gives every
member's config, `load_config(..., member=m)` one of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dreamshot.config.schema import Config
from dreamshot.utils.errors import ConfigError
from dreamshot.utils.text import read_yaml_file

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
EXPERIMENTS_DIR = REPO_ROOT / "experiments"
GROUPS = ("model", "data", "trainer", "logger")
# Keys of an experiment file that steer composition rather than set config values.
_META_KEYS = ("extends", "groups", "sweep")


def available_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def load_runs(experiment: str | Path, overrides: list[str] | None = None) -> list[Config]:
    """The configs of an experiment's runs: one, or one per sweep member."""
    members = sweep_members(experiment)
    if not members:
        return [load_config(experiment, overrides)]
    return [load_config(experiment, overrides, member) for member in members]


def sweep_members(experiment: str | Path) -> dict[str, list[str]]:
    """An experiment's sweep (member name -> overrides); empty when it is a single run."""
    for path, body in reversed(_experiment_chain(experiment)):
        if "sweep" in body:
            return _sweep_of(body["sweep"], path)
    return {}


def load_config(
    experiment: str | Path | None = None, overrides: list[str] | None = None, member: str | None = None
) -> Config:
    """The typed, validated config of an experiment (a name in `experiments/` or a yaml path).

    For a sweep experiment, `member` names the run (its overrides apply before the command line's).
    """
    members = sweep_members(experiment) if experiment else {}
    if members and member not in members:
        raise ConfigError(
            f"experiment {Path(str(experiment)).stem!r} is a sweep of {', '.join(members)}; "
            f"{'pick one of them' if member is None else f'it has no member {member!r}'}"
        )
    overrides = [*(members[member] if members else []), *(overrides or [])]
    group_choices, dotlist = _split_overrides(overrides)
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
        return merge_checked(cfg, update, source)

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
    cfg = merge(OmegaConf.from_dotlist(dotlist), "command line")
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config: {describe_error(e)}") from None
    try:
        config.validate()
    except ConfigError as e:
        origin = _origin(sources, e.key) if e.key else None
        if origin is None:
            raise
        raise ConfigError(f"{e} (set {origin})", e.key) from None
    return config


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


def merge_checked(cfg: DictConfig, update: Any, source: Path | str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, update)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {describe_error(e)}") from None


def describe_error(e: OmegaConfBaseException) -> str:
    message = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{message} (key: {key})" if key and key not in message else message
