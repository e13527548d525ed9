"""Shot-wise cross-attention: equals the dense block-diagonal form, equals Wan's processor for one frame, and
lets each frame see only its own text."""

import pytest
import torch
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    WanTransformer3DModel,
)

from dreamshot.models.wan.attention import (
    ShotwiseCrossAttnProcessor,
    dense_shotwise_attention,
    shotwise_attention,
    use_shotwise_cross_attention,
)

DIM, HEADS = 16, 2
FRAMES, TOKENS, TEXT_LEN = 3, 4, 5


def cross_attention() -> WanAttention:
    torch.manual_seed(0)
    return WanAttention(dim=DIM, heads=HEADS, dim_head=DIM // HEADS, cross_attention_dim_head=DIM // HEADS)


def frame_slice(f: int) -> slice:
    return slice(f * TOKENS, (f + 1) * TOKENS)


def test_shotwise_equals_dense_masked_attention():
    generator = torch.Generator().manual_seed(0)
    batch, frames, s, length, heads, d = 2, 4, 6, 5, 2, 8
    query = torch.randn(batch, frames * s, heads, d, generator=generator)
    key, value = torch.randn(2, batch, frames * length, heads, d, generator=generator)

    out = shotwise_attention(query, key, value, frames)

    assert out.shape == query.shape
    torch.testing.assert_close(out, dense_shotwise_attention(query, key, value, frames), atol=1e-5, rtol=1e-5)


def test_one_frame_equals_wan_processor():
    attn = cross_attention()
    hidden = torch.randn(2, 12, DIM)
    text = torch.randn(2, TEXT_LEN, DIM)

    expected = WanAttnProcessor()(attn, hidden, text)
    got = ShotwiseCrossAttnProcessor(TEXT_LEN)(attn, hidden, text)

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_each_frame_sees_only_its_own_text():
    attn = cross_attention()
    processor = ShotwiseCrossAttnProcessor(TEXT_LEN)
    hidden = torch.randn(1, FRAMES * TOKENS, DIM)
    text = torch.randn(1, FRAMES * TEXT_LEN, DIM)
    changed = text.clone()
    changed[:, TEXT_LEN : 2 * TEXT_LEN] = torch.randn(TEXT_LEN, DIM)  # frame 1's text only

    before, after = processor(attn, hidden, text), processor(attn, hidden, changed)

    assert not torch.allclose(before[:, frame_slice(1)], after[:, frame_slice(1)], atol=1e-3)
    for f in (0, 2):
        torch.testing.assert_close(before[:, frame_slice(f)], after[:, frame_slice(f)], atol=1e-6, rtol=0)
    # Wan's own cross-attention lets every frame see all texts, so there frame 0 does change.
    wan = WanAttnProcessor()
    wan_before, wan_after = wan(attn, hidden, text), wan(attn, hidden, changed)
    assert not torch.allclose(wan_before[:, frame_slice(0)], wan_after[:, frame_slice(0)], atol=1e-3)


def test_zero_padding_is_attended_so_text_len_changes_the_output():
    """Wan does not mask its text padding: the same text padded to another length gives another output. This is
    why a shorter model.text_len is not free with pretrained weights (README, planner)."""
    attn = cross_attention()
    attn.set_processor(ShotwiseCrossAttnProcessor(TEXT_LEN))
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(1, TOKENS, DIM, generator=generator)
    words = torch.randn(1, 3, DIM, generator=generator)
    outputs = []
    for length in (TEXT_LEN, 2 * TEXT_LEN):
        attn.processor.text_len = length
        text = torch.cat([words, torch.zeros(1, length - 3, DIM)], dim=1)
        outputs.append(attn(video, text))
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)


@pytest.mark.parametrize(
    ("video_tokens", "text_tokens", "message"),
    [(12, 2 * TEXT_LEN + 1, "text_len=5"), (13, 2 * TEXT_LEN, "13 video tokens")],
)
def test_indivisible_lengths_are_rejected(video_tokens, text_tokens, message):
    processor = ShotwiseCrossAttnProcessor(TEXT_LEN)
    with pytest.raises(ValueError, match=message):
        processor(cross_attention(), torch.randn(1, video_tokens, DIM), torch.randn(1, text_tokens, DIM))


def test_image_conditioned_and_fused_modules_are_rejected():
    processor = ShotwiseCrossAttnProcessor(TEXT_LEN)
    hidden, text = torch.randn(1, TOKENS, DIM), torch.randn(1, TEXT_LEN, DIM)
    head_dim = DIM // HEADS
    i2v = WanAttention(DIM, HEADS, head_dim, added_kv_proj_dim=DIM, cross_attention_dim_head=head_dim)
    with pytest.raises(ValueError, match="text-to-video"):
        processor(i2v, hidden, text)
    fused = cross_attention()
    fused.fuse_projections()
    with pytest.raises(ValueError, match="unfused"):
        processor(fused, hidden, text)


def test_installed_on_every_cross_attention_and_runs_in_a_block():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        num_layers=2,
        num_attention_heads=HEADS,
        attention_head_dim=DIM // HEADS,
        in_channels=4,
        out_channels=4,
        text_dim=DIM,
        freq_dim=DIM,
        ffn_dim=32,
    )
    use_shotwise_cross_attention(transformer, TEXT_LEN)

    for block in transformer.blocks:
        assert isinstance(block.attn2.processor, ShotwiseCrossAttnProcessor)
        assert isinstance(block.attn1.processor, WanAttnProcessor)
    block = transformer.blocks[0]
    hidden = torch.randn(1, FRAMES * TOKENS, DIM)
    text = torch.randn(1, FRAMES * TEXT_LEN, DIM)
    rotary = transformer.rope(torch.zeros(1, 4, FRAMES, 4, 4))  # 2×2 = TOKENS per frame
    out = block(hidden, text, torch.randn(1, 6, DIM), rotary)
    assert out.shape == hidden.shape and torch.isfinite(out).all()
