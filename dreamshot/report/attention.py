"""Role-attention maps of a trained run over a storyboard, reference role by reference role (paper Fig. 7).

The storyboard's shots are noised to a fixed t and the run's DiT predicts their velocity once, with the
references clean in the condition slot, exactly as in training (r2s). A `RoleCapture` over the run's RACL blocks
records, for each reference role, the attention of its reference tokens over each shot's tokens (DESIGN §2,
Eq. 5: the same maps RACL trains and validation's diagnostic measures). With RACL the maps of different roles
should land on different characters; without it they overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dreamshot.config.schema import Config
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.diffusion.conditioning import storyboard_layout
from dreamshot.diffusion.flow_matching import add_noise, dit_timesteps
from dreamshot.diffusion.racl import build_role_plan, token_grid_masks
from dreamshot.inference.loading import load_lora, read_lora, resolve_config, run_weights, with_lora
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.models.wan.role_capture import RoleCapture
from dreamshot.utils.errors import DataError


@dataclass
class RoleAttention:
    """Reference role attention over one storyboard.

    maps: (K', N, h, w) — row i is reference role `roles[i]`'s attention over each shot's token grid (each
    (i, n) map sums to 1; K' <= K: a role too small to cover a token in its reference has no map).
    in_mask: (K', N) — the share of that attention inside the role's own token mask in the shot (NaN where the
    role is absent). shots: (N, 3, H, W), refs: (K, 3, H, W) in [-1, 1]; shot_masks: (N, K, H, W) in {0, 1}.
    """

    maps: torch.Tensor
    in_mask: torch.Tensor
    roles: list[int]
    shots: torch.Tensor
    refs: torch.Tensor
    shot_masks: torch.Tensor
    ref_texts: list[str]
    shot_texts: list[str]
    t: float


def load_run(run_dir: Path, device: torch.device | str = "cpu") -> tuple[Config, WanAdapter]:
    """A run's config and its backbone with the run's LoRA, role capture installed on the run's RACL blocks."""
    weights = run_weights(run_dir)
    lora = read_lora(weights)
    cfg = with_lora(resolve_config(weights, None, []), lora, str(weights))
    adapter = WanAdapter.seeded(cfg.model, cfg.seed, capture_blocks=cfg.racl_blocks())
    load_lora(adapter, lora, weights)
    return cfg, adapter.to(device).eval()


def validation_storyboard(cfg: Config, run_dir: Path, index: int = 0) -> dict:
    """The run's `index`-th held-out storyboard with references, at its first phase's resolution
    (a `StoryboardDataset` item). The toy world is read from (or rewritten into) the run folder."""
    data = StoryboardDataModule(cfg.data, run_dir, cfg.seed, cfg.curriculum)
    data.setup("fit")
    with_refs = [i for i, record in enumerate(data.val_records) if record.references]
    if index >= len(with_refs):
        raise DataError(f"{run_dir}: {len(with_refs)} validation storyboards have references; asked for #{index}")
    return data.val_set[with_refs[index]]


@torch.no_grad()
def reference_attention(adapter: WanAdapter, cfg: Config, sample: dict, t: float = 0.5, seed: int = 0) -> RoleAttention:
    """Each reference role's attention over the shots of `sample` (a `StoryboardDataset` item) at noise level t."""
    device = next(adapter.parameters()).device
    shots, refs = sample["shots"].to(device), sample["refs"].to(device)
    (k, _, height, width), n = refs.shape, shots.shape[0]
    latents = adapter.encode_storyboard(shots[None], refs[None], [sample["shot_texts"]], [sample["ref_texts"]])
    layout = storyboard_layout(cfg.storyboard, k, range(n))

    # 1. Sources: reference k's tokens of role k. Shots get empty masks: they are only attended to.
    ref_masks = torch.eye(k, device=device)[:, :, None, None] * sample["ref_masks"].to(device)[:, None]
    frame_masks = layout.assemble(ref_masks, torch.zeros(n, k, height, width, device=device), dim=0)
    _, p_h, p_w = adapter.patch_size
    grid = (latents.shots.shape[-2] // p_h, latents.shots.shape[-1] // p_w)
    tokens = token_grid_masks(frame_masks, grid, cfg.racl.mask_threshold).flatten(-2)  # (F, K, S)
    plan = build_role_plan(tokens, layout.target_frames().to(device))
    capture = RoleCapture([plan], frozenset(cfg.racl_blocks()))

    # 2. One forward at noise level t, references clean (per-token timestep 0 where the model takes one).
    noise = torch.randn(latents.shots.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    level = torch.tensor([t], device=device)
    sequence = layout.assemble(latents.refs, add_noise(latents.shots, noise, level))
    text = layout.assemble(latents.ref_text, latents.shot_text, dim=1)
    per_token = cfg.diffusion.timestep_mode == "per_token"
    timesteps = dit_timesteps(level, layout.target_frames(), per_token)
    adapter.predict_velocity(sequence, timesteps, text, layout, capture)

    # 3. Maps per source, averaged over the captured blocks; sources are (frame, role) pairs in frame order.
    maps = capture.block_mean()[0].float().cpu()  # (K', N, S)
    roles = tokens.any(-1).nonzero(as_tuple=True)[1].tolist()
    shot_tokens = token_grid_masks(sample["shot_masks"], grid, cfg.racl.mask_threshold).flatten(-2).float()  # (N, K, S)
    own = shot_tokens[:, roles].transpose(0, 1)  # (K', N, S)
    in_mask = (maps * own).sum(-1).masked_fill(~own.bool().any(-1), float("nan"))
    return RoleAttention(
        maps=maps.unflatten(-1, grid),
        in_mask=in_mask,
        roles=roles,
        shots=sample["shots"],
        refs=sample["refs"],
        shot_masks=sample["shot_masks"],
        ref_texts=list(sample["ref_texts"]),
        shot_texts=list(sample["shot_texts"]),
        t=t,
    )
