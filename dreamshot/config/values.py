"""Per-value checks of a composed config, so a meaningless number fails at load rather than deep in torch.

Every float must be finite and every integer must fit in 64 bits (torch and numpy take nothing larger);
`RULES` bounds the run config's values that have a meaningful range (`PREPARE_RULES` those of
`dreamshot prepare`, `TOY_WORLD_RULES` those of a toy world, wherever it is configured). Cross-field rules stay in
the configs' `validate`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from dreamshot.utils.errors import ConfigError

INT64_MAX = 2**63 - 1
# torch.manual_seed, numpy and Lightning's seed_everything all take seeds in [0, 2**32).
SEED_LIMIT = 2**32


@dataclasses.dataclass(frozen=True)
class Rule:
    """`what` a value must be ("> 0"), and the test."""

    what: str
    holds: Callable[[Any], bool]


POSITIVE = Rule("> 0", lambda v: v > 0)
NON_NEGATIVE = Rule(">= 0", lambda v: v >= 0)
AT_LEAST_ONE = Rule(">= 1", lambda v: v >= 1)
SEED = Rule(f"an integer in [0, 2**32) (0..{SEED_LIMIT - 1})", lambda v: 0 <= v < SEED_LIMIT)
UNIT_OPEN = Rule("in [0, 1)", lambda v: 0 <= v < 1)
UNIT = Rule("in [0, 1]", lambda v: 0 <= v <= 1)

# The toy world (dreamshot/data/toyworld.py) gives each role of a group its own colour, of 9 (its COLOURS); below
# 16 pixels a side, a wide shot's characters (0.3 of the short side) would shrink to a few pixels.
TOY_MAX_ROLES = 9
TOY_MIN_SIDE = 16
# A toy world's bounded values (data.toy, eval.toy, `dreamshot toyworld`), keys as `flat_items` writes them for a
# ToyWorldConfig; `check_toy_world` in schema.py applies them.
TOY_WORLD_RULES: dict[str, Rule] = {
    "groups": AT_LEAST_ONE,
    "seed": SEED,
    "image_size[]": Rule(f">= {TOY_MIN_SIDE}", lambda v: v >= TOY_MIN_SIDE),
    "min_shots": AT_LEAST_ONE,
    "max_shots": AT_LEAST_ONE,
    "max_roles": Rule(f"in 1..{TOY_MAX_ROLES}", lambda v: 1 <= v <= TOY_MAX_ROLES),
    "real_share": UNIT,
}

# The run config's bounded values; keys as `flat_items` writes them, list indices as "[]".
RULES: dict[str, Rule] = {
    "seed": SEED,
    "model.text_len": AT_LEAST_ONE,
    "model.transformer.num_layers": AT_LEAST_ONE,
    "model.transformer.num_attention_heads": AT_LEAST_ONE,
    "model.transformer.ffn_dim": AT_LEAST_ONE,
    "model.transformer.text_dim": AT_LEAST_ONE,
    "model.transformer.freq_dim": AT_LEAST_ONE,
    "model.transformer.in_channels": AT_LEAST_ONE,
    "model.transformer.rope_max_seq_len": AT_LEAST_ONE,
    "model.vae.base_dim": AT_LEAST_ONE,
    "model.vae.z_dim": AT_LEAST_ONE,
    "model.vae.num_res_blocks": AT_LEAST_ONE,
    "model.text_encoder.d_model": AT_LEAST_ONE,
    "model.text_encoder.d_kv": AT_LEAST_ONE,
    "model.text_encoder.d_ff": AT_LEAST_ONE,
    "model.text_encoder.num_layers": AT_LEAST_ONE,
    "model.text_encoder.num_heads": AT_LEAST_ONE,
    "model.text_encoder.vocab_size": AT_LEAST_ONE,
    "model.lora.rank": AT_LEAST_ONE,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": UNIT_OPEN,
    "data.max_shots": AT_LEAST_ONE,
    "data.batch_size": AT_LEAST_ONE,
    "data.num_workers": NON_NEGATIVE,
    "data.val_groups": NON_NEGATIVE,
    "data.cache_shard_size": AT_LEAST_ONE,
    "diffusion.shift": POSITIVE,
    "storyboard.drop_joint": UNIT,
    "storyboard.drop_refs": UNIT,
    "storyboard.drop_text": UNIT,
    # The `neg` layout's backward gap between the references and the shots.
    "storyboard.neg_offset": NON_NEGATIVE,
    "racl.weight": NON_NEGATIVE,
    "racl.mask_threshold": Rule("in (0, 1]", lambda v: 0 < v <= 1),
    "curriculum[].steps": AT_LEAST_ONE,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.eps": POSITIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.grad_clip": NON_NEGATIVE,
    "optim.min_lr_ratio": UNIT,
    "optim.ema_decay": UNIT_OPEN,
    "trainer.max_steps": AT_LEAST_ONE,
    "trainer.devices": AT_LEAST_ONE,
    "trainer.num_nodes": AT_LEAST_ONE,
    "trainer.accumulate_grad_batches": AT_LEAST_ONE,
    "trainer.log_every_n_steps": AT_LEAST_ONE,
    "trainer.checkpoint_every_n_steps": AT_LEAST_ONE,
    "trainer.val_check_interval": AT_LEAST_ONE,
    "trainer.max_nonfinite_steps": NON_NEGATIVE,
    "trainer.keep_last_checkpoints": AT_LEAST_ONE,
    "trainer.sample.every_n_steps": NON_NEGATIVE,
    "trainer.sample.steps": AT_LEAST_ONE,
    "inference.steps": AT_LEAST_ONE,
    "inference.shift": POSITIVE,
    "inference.seed": SEED,
    "inference.guidance_fraction": UNIT,
    # Eq. 9's weights: 0 drops a condition's pull, a negative weight pushes the shots away from their conditions.
    "inference.omega1": NON_NEGATIVE,
    "inference.omega2": NON_NEGATIVE,
    "eval.steps": AT_LEAST_ONE,
    "eval.face.det_size": AT_LEAST_ONE,
    "eval.detector.box_threshold": UNIT,
    "eval.detector.text_threshold": UNIT,
    "eval.callback.every_n_steps": AT_LEAST_ONE,
    "eval.callback.stories": AT_LEAST_ONE,
    "eval.callback.steps": AT_LEAST_ONE,
    "eval.judge.seed": SEED,
    "eval.judge.max_retries": AT_LEAST_ONE,
    "eval.judge.max_concurrency": AT_LEAST_ONE,
    "eval.judge.backoff_base_s": POSITIVE,
    "eval.judge.backoff_max_s": POSITIVE,
    "eval.judge.backoff_total_s": POSITIVE,
    "eval.judge.temperature": NON_NEGATIVE,
    "eval.judge.max_tokens": AT_LEAST_ONE,
    "eval.judge.retry_wait_s": NON_NEGATIVE,
    "eval.judge.timeout_s": POSITIVE,
    "eval.judge.image_size": AT_LEAST_ONE,
}


def check_values(config: Any, rules: dict[str, Rule], prefix: str = "") -> None:
    """Raise ConfigError (with its `key`) at the first value of the dataclass `config` that is not finite, does
    not fit in 64 bits or breaks its rule in `rules` (keyed by `config`'s own keys). `prefix` is where `config`
    sits in the run config ("data.toy."): the message and the error's key name the value with it."""
    for own_key, value in flat_items(dataclasses.asdict(config)):
        if isinstance(value, bool) or value is None or not isinstance(value, int | float):
            continue
        key = prefix + own_key
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}", key=key)
        if isinstance(value, int) and abs(value) > INT64_MAX:
            raise ConfigError(f"{key} is out of range: {value} does not fit in 64 bits", key=key)
        rule = rules.get(re.sub(r"\[\d+\]", "[]", own_key))
        if rule is not None and not rule.holds(value):
            raise ConfigError(f"{key} must be {rule.what}, got {value!r}", key=key)


def flat_items(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of nested dicts and lists: "optim.lr", "curriculum[0].steps"."""
    if isinstance(node, dict):
        for name, child in node.items():
            yield from flat_items(child, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from flat_items(child, f"{prefix}[{index}]")
    else:
        yield prefix, node
