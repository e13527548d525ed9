"""Compiled DiT blocks (trainer.compile_blocks) train the same LoRA as eager ones."""

import torch

from dreamshot.config.schema import ModelConfig
from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.adapter import WanAdapter

# A block with the role-capture processor installed: with nothing captured it runs compiled like the others.
CAPTURED = 1


def _loss_and_grads(adapter: WanAdapter) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 16, 4, 4, 6, generator=g)
    text = torch.randn(1, 4, adapter.cfg.text_len, 32, generator=g)
    timesteps = torch.tensor([[0.0, 500.0, 500.0, 500.0]])  # one per frame: a clean condition, 3 targets
    loss = adapter.predict_velocity(latents, timesteps, text, StoryboardLayout.of(1, 3)).square().mean()
    loss.backward()
    grads = {name: p.grad for name, p in adapter.transformer.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_compiled_blocks_give_eager_loss_and_lora_gradients():
    cfg = ModelConfig()
    kwargs = {"gradient_checkpointing": True, "capture_blocks": [CAPTURED]}
    eager = WanAdapter.seeded(cfg, 0, **kwargs).train()
    compiled = WanAdapter.seeded(cfg, 0, compiled=True, **kwargs).train()
    # LoRA B starts at zero, which would hide a wrong A gradient: give both models the same nonzero B.
    torch.manual_seed(1)
    state = {key: torch.randn_like(value) for key, value in eager.lora_state_dict().items()}
    eager.load_lora_state_dict(state)
    compiled.load_lora_state_dict(state)

    eager_loss, eager_grads = _loss_and_grads(eager)
    compiled_loss, compiled_grads = _loss_and_grads(compiled)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Compiled in place: parameter names (so LoRA keys and checkpoints) do not change.
    assert compiled.lora_state_dict().keys() == eager.lora_state_dict().keys()
    assert all(block._compiled_call_impl is not None for block in compiled.transformer.blocks)
