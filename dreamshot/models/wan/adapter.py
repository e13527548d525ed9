"""`WanAdapter`: the one object that owns everything Wan-specific.

The trainer, the pipeline and the metrics talk to it in storyboard terms — images, texts, a
`StoryboardLayout` — and never import diffusers' Wan classes (finetrainers' backbone-adapter pattern).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import nn

from dreamshot.config.schema import InferenceConfig, ModelConfig
from dreamshot.diffusion.conditioning import StoryboardLatents
from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.attention import CrossAttentionText, cross_attention_text, use_shotwise_cross_attention
from dreamshot.models.wan.block_cache import CacheContext, block_cache
from dreamshot.models.wan.build import build_components
from dreamshot.models.wan.context_parallel import ContextParallel
from dreamshot.models.wan.forward import compile_blocks, run_block, storyboard_forward, use_frame_modulation
from dreamshot.models.wan.latents import decode_in_context, encode_references, encode_shots
from dreamshot.models.wan.lora import apply_lora, load_lora_state_dict, lora_state_dict
from dreamshot.models.wan.role_capture import RoleCapture, use_role_capture, use_storyboard_self_attention
from dreamshot.models.wan.rope import storyboard_rotary_emb
from dreamshot.models.wan.text import encode_texts


class WanAdapter(nn.Module):
    """Wan2.1 transformer with LoRA, its frozen VAE and umT5, and the storyboard forward."""

    def __init__(
        self,
        cfg: ModelConfig,
        gradient_checkpointing: bool = False,
        capture_blocks: list[int] | None = None,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = gradient_checkpointing
        parts = build_components(cfg)
        self.transformer = parts.transformer
        self.vae = parts.vae
        self.text_encoder = parts.text_encoder
        self.tokenizer = parts.tokenizer
        use_shotwise_cross_attention(self.transformer, cfg.text_len)
        use_frame_modulation(self.transformer)
        use_storyboard_self_attention(self.transformer)
        use_role_capture(self.transformer, capture_blocks or [])
        apply_lora(self.transformer, cfg.lora)
        if compiled:
            compile_blocks(self.transformer)
        # The group this process shares each storyboard with (set once the processes are started: the training
        # strategy's mesh, or torchrun's for sampling); degree 1 until then.
        self.context_parallel = ContextParallel()

    @classmethod
    def seeded(cls, cfg: ModelConfig, seed: int, **kwargs) -> WanAdapter:
        """Build under `seed` without touching the caller's RNG: a random (tiny) backbone is then the same
        in training and at inference, so a LoRA trained on it applies to the same frozen weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(cfg, **kwargs)

    def train(self, mode: bool = True) -> WanAdapter:
        """Only the DiT changes mode: the frozen VAE and umT5 always run in eval (no dropout)."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer.config.patch_size)

    @torch.no_grad()
    def encode_text(self, texts: list[list[str]]) -> torch.Tensor:
        """Texts (B rows of F strings) -> (B, F, L, D) umT5 embeddings, zero after each text's end."""
        return encode_texts(self.text_encoder, self.tokenizer, texts, self.cfg.text_len)

    @torch.no_grad()
    def encode_storyboard(
        self, shots: torch.Tensor, refs: torch.Tensor, shot_texts: list[list[str]], ref_texts: list[list[str]]
    ) -> StoryboardLatents:
        """Images in [-1, 1] (shots (B, N, 3, H, W), refs (B, K, 3, H, W)) and texts -> latents and embeddings."""
        texts = [r + s for r, s in zip(ref_texts, shot_texts, strict=True)]
        embedded = self.encode_text(texts)
        k = refs.shape[1]
        return StoryboardLatents(
            refs=encode_references(self.vae, refs),
            shots=encode_shots(self.vae, shots),
            ref_text=embedded[:, :k],
            shot_text=embedded[:, k:],
        )

    @torch.no_grad()
    def decode_shots(
        self,
        targets: torch.Tensor,
        target_positions: list[int],
        given: torch.Tensor | None = None,
        given_positions: list[int] | None = None,
    ) -> torch.Tensor:
        """(B, C, N, h, w) normalised target latents at their story positions -> (B, N, 3, H, W) in [-1, 1],
        decoded in one stream with the given shots' latents (B, C, M, h, w) when there are any."""
        given = targets[:, :, :0] if given is None else given
        return decode_in_context(self.vae, given, targets, given_positions or [], target_positions)

    def block_cache(self, settings: InferenceConfig, steps: int) -> AbstractContextManager[CacheContext]:
        """`inference.cache` on the DiT for one sampling run of `steps` steps (`block_cache.py`); the context yields
        the function that names each forward's cache context."""
        return block_cache(self.transformer, settings, steps, self.context_parallel)

    @torch.no_grad()
    def cross_attention_text(self, texts: torch.Tensor) -> CrossAttentionText:
        """Every block's cross-attention keys and values of U distinct frame texts (U, L, D), for a sampler to
        compute once per storyboard and pass to `predict_velocity` with each forward's frames selected."""
        return cross_attention_text(self.transformer, texts)

    def rotary_emb(self, layout: StoryboardLayout, latent_size: tuple[int, int], device) -> tuple[torch.Tensor, ...]:
        """The storyboard RoPE (cos, sin) of `layout` for latents of `latent_size` (h, w)."""
        _, p_h, p_w = self.patch_size
        grid = (latent_size[0] // p_h, latent_size[1] // p_w)
        return storyboard_rotary_emb(layout, grid, self.transformer.config.attention_head_dim, device=device)

    def predict_velocity(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor | CrossAttentionText,
        layout: StoryboardLayout,
        capture: RoleCapture | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """v_θ for one storyboard sequence.

        latents: (B, C, F, h, w) in the layout's sequence order; timesteps: (B,) or (B, F) per frame;
        text: (B, F, L, D), each frame's own text in the same order, or its keys and values projected once
        (`cross_attention_text`, the B × F frames selected). Returns (B, C, F, h, w).
        With `capture`, the captured blocks also fill `capture.maps` with role-attention maps. `rotary`: the
        layout's RoPE when the caller computed it once (`rotary_emb`). Latents and text of any float dtype enter
        the DiT in its own (see `_dit_dtype`).
        """
        _, _, frames, height, width = latents.shape
        if frames != layout.num_frames or text.shape[1] != frames:
            raise ValueError(f"layout has {layout.num_frames} frames, latents {frames}, texts {text.shape[1]}")
        if rotary is None:
            rotary = self.rotary_emb(layout, (height, width), latents.device)
        _, p_h, p_w = self.patch_size
        dtype = self._dit_dtype()
        return storyboard_forward(
            self.transformer,
            latents.to(dtype),
            timesteps,
            text if isinstance(text, CrossAttentionText) else text.flatten(1, 2).to(dtype),
            rotary,
            gradient_checkpointing=self.gradient_checkpointing,
            block_runner=capture.runner if capture is not None else run_block,
            shard=self.context_parallel.shard(frames, (height // p_h) * (width // p_w)),
        )

    def _dit_dtype(self) -> torch.dtype:
        """The dtype the DiT takes its latents and text in: its patch embedding's (diffusers' `dtype` property walks
        every module). DeepSpeed's bf16 mode runs its bf16 DiT without autocast on data as stored (float32 latents,
        and float32 texts from a float32 umT5's cache: `BatchAsStoredPrecision`): this is their one cast, after z_t
        and the target are formed. Otherwise it changes no value: a float32 DiT takes float32, texts come in
        `model.dtype` as the DiT is held, and under bf16 autocast (`ddp`) the patch embedding rounds its input to
        bf16 all the same."""
        return self.transformer.patch_embedding.weight.dtype

    def lora_state_dict(self, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.transformer, weights)

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state_dict(self.transformer, state)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]
