"""`dreamshot plan`: exact counts from the meta model, hand-computed FLOPs and memory, the activation model
against what autograd really saves in a Wan block, ZeRO sharding, checkpointing, and the command line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dreamshot.cli import main
from dreamshot.config.load import load_config
from dreamshot.config.schema import LoraConfig, ModelConfig, TransformerConfig
from dreamshot.models.wan.attention import use_shotwise_cross_attention
from dreamshot.models.wan.build import build_components
from dreamshot.models.wan.forward import use_frame_modulation
from dreamshot.models.wan.lora import apply_lora
from dreamshot.planner.flops import (
    CROSS_PROJECTIONS,
    CROSS_SCORES,
    FFN,
    LORA,
    RACL,
    SELF_PROJECTIONS,
    SELF_SCORES,
    training_flops,
)
from dreamshot.planner.memory import activation_memory, block_saved_bytes, racl_bytes, state_memory
from dreamshot.planner.plan import config_training
from dreamshot.planner.shape import ModelShape, model_shape
from dreamshot.planner.workload import Training, Workload, parse_resolution, tokens_per_frame, zero_stage
from dreamshot.utils.errors import ConfigError

# 1 block, D = 2 heads x 32 = 64, FFN 128, text_dim 32, LoRA rank 4 on the attention and FFN linears.
TOY = ModelConfig(
    transformer=TransformerConfig(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=128),
    lora=LoraConfig(rank=4),
)
# 3 frames of S = 8 tokens (T = 24), L = 4 text tokens per frame (12 in all).
TOY_WORK = Workload(frames=3, tokens_per_frame=8, text_len=4, target_frames=2, checkpointing=False)


@pytest.fixture(scope="module")
def toy_shape() -> ModelShape:
    return model_shape(TOY)


def test_toy_parameter_counts_by_hand(toy_shape):
    linear = 64 * 64 + 64
    patch_embedding = 16 * 2 * 2 * 64 + 64
    # time embedder 32->64->64, time projection 64->6*64, text embedder 32->64->64
    condition = (32 * 64 + 64) + linear + (64 * 384 + 384) + (32 * 64 + 64) + linear
    # 8 attention linears, q/k RMSNorm weights of 2 attentions, norm2 affine, FFN, modulation table
    block = 8 * linear + 4 * 64 + 2 * 64 + (64 * 128 + 128) + (128 * 64 + 64) + 6 * 64
    head = (64 * 64 + 64) + 2 * 64
    assert toy_shape.dit_params == patch_embedding + condition + block + head == 96_576
    # rank x (in + out): 8 square attention linears, FFN up and down
    assert toy_shape.lora_params == 4 * (8 * 128 + 2 * (64 + 128)) == 5_632
    # The meta counts equal a real build's.
    parts = build_components(TOY)
    assert toy_shape.text_encoder_params == sum(p.numel() for p in parts.text_encoder.parameters())
    assert toy_shape.vae_params == sum(p.numel() for p in parts.vae.parameters())
    text_side = {linear.name for linear in toy_shape.linears if linear.text}
    assert text_side == {"attn2.to_k", "attn2.to_v"} and all(linear.lora for linear in toy_shape.linears)


def test_toy_flops_by_hand(toy_shape):
    flops = training_flops(toy_shape, TOY_WORK)
    video, text = 2 * 24 * 64 * 64, 2 * 12 * 64 * 64  # one 64x64 linear on 24 video / 12 text tokens
    ffn = 2 * 24 * 64 * 128
    lora_video, lora_ffn, lora_text = 2 * 24 * 4 * 128, 2 * 24 * 4 * 192, 2 * 12 * 4 * 128
    assert flops.forward == {
        SELF_PROJECTIONS: 4 * video,
        SELF_SCORES: 4 * 24 * 24 * 64,
        CROSS_PROJECTIONS: 2 * video + 2 * text,
        CROSS_SCORES: 3 * 4 * 8 * 4 * 64,  # per frame: 8 queries x 4 keys, QK^T and PV
        FFN: 2 * ffn,
        LORA: 6 * lora_video + 2 * lora_ffn + 2 * lora_text,
        RACL: 0,
    }
    # Frozen: dX only, none for the text K/V; scores 2.5x; LoRA 2x on video, forward + grad through B on text.
    assert flops.backward == {
        SELF_PROJECTIONS: 4 * video,
        SELF_SCORES: 5 * 4 * 24 * 24 * 64 // 2,
        CROSS_PROJECTIONS: 2 * video,
        CROSS_SCORES: 5 * 3 * 4 * 8 * 4 * 64 // 2,
        FFN: 2 * ffn,
        LORA: 2 * (6 * lora_video + 2 * lora_ffn) + 2 * (lora_text + 2 * 12 * 4 * 64),
        RACL: 0,
    }
    assert sum(flops.recompute.values()) == 0


def test_racl_flops_and_memory_by_hand(toy_shape):
    work = dataclasses.replace(TOY_WORK, racl_blocks=1, racl_queries=5)
    flops = training_flops(toy_shape, work)
    # 2 target shots x 5 query rows x 8 keys x D = 64
    assert flops.forward[RACL] == 2 * 2 * 5 * 8 * 64 and flops.backward[RACL] == 2 * flops.forward[RACL]
    # live chunk: fp32 logits + softmax of 5 x 8, the shot's 8 keys in fp32 (D = 64); kept for backward: each of
    # the 2 chunks' softmax and fp32 keys, and the 5 fp32 query rows
    live, kept = 5 * 8 * 8 + 8 * 64 * 4, 2 * (5 * 8 + 8 * 64) * 4 + 5 * 64 * 4
    assert racl_bytes(toy_shape, work) == live + kept
    assert racl_bytes(toy_shape, dataclasses.replace(work, racl_blocks=3)) == live + 3 * kept
    checkpointed = dataclasses.replace(work, racl_blocks=3, checkpointing=True)
    assert racl_bytes(toy_shape, checkpointed) == racl_bytes(toy_shape, work)  # only the recomputed block keeps


# The three ways the LoRA branch of a bf16 model runs: apply_lora's float32 weights without autocast
# ("32-true"); DeepSpeed's bf16 mode, whose engine casts every parameter to bf16; bf16-mixed without DeepSpeed,
# under autocast.
PRECISIONS = {
    "fp32-lora": Training(half_precision=False),
    "deepspeed-bf16": Training(zero_stage=2, half_precision=True),
    "autocast": Training(half_precision=True),
}


def _saved_by_autograd(cfg: ModelConfig, work: Workload, training: Training) -> int:
    """Bytes of the distinct storages a real Wan block saves for backward (bf16, train mode, LoRA, shot-wise
    cross-attention, precision as `training` says), leaving out parameters and the block's inputs."""
    torch.manual_seed(0)
    transformer = build_components(dataclasses.replace(cfg, dtype="bfloat16")).transformer
    use_shotwise_cross_attention(transformer, work.text_len)
    use_frame_modulation(transformer)
    apply_lora(transformer, cfg.lora)
    if training.deepspeed_half:
        for parameter in transformer.parameters():
            parameter.data = parameter.data.to(torch.bfloat16)
    block = transformer.blocks[0].train()
    dim, head_dim = 64, cfg.transformer.attention_head_dim
    hidden = torch.randn(1, work.tokens, dim, dtype=torch.bfloat16, requires_grad=True)
    text = torch.randn(1, work.text_tokens, dim, dtype=torch.bfloat16)
    temb = torch.randn(1, *((work.frames,) if work.per_token_timestep else ()), 6, dim, dtype=torch.bfloat16)
    rotary = (torch.randn(1, work.tokens, 1, head_dim), torch.randn(1, work.tokens, 1, head_dim))
    saved = []
    # Lightning enters autocast with cache_enabled=False: every matmul casts its weight afresh.
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=training.autocast, cache_enabled=False)
    with autocast, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        block(hidden, text, temb, rotary)
    excluded = {t.untyped_storage().data_ptr() for t in [*transformer.parameters(), hidden, text, temb, *rotary]}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(nbytes for pointer, nbytes in storages.items() if pointer not in excluded)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("targets", [None, ["to_q", "to_k", "ffn.net.2"]])
def test_block_activation_model_equals_what_autograd_saves(precision, per_token, targets):
    cfg = TOY if targets is None else dataclasses.replace(TOY, lora=LoraConfig(rank=4, target_modules=targets))
    work, training = dataclasses.replace(TOY_WORK, per_token_timestep=per_token), PRECISIONS[precision]
    # On CPU torch's RMSNorm is the composite path (it keeps an fp32 copy of its input).
    assert block_saved_bytes(model_shape(cfg, count_encoders=False), work, training, fused_rms_norm=False) == (
        _saved_by_autograd(cfg, work, training)
    )


def test_fp32_lora_keeps_a_cast_copy_of_its_input_per_adapter(toy_shape):
    # Float32 LoRA, bf16 activations: each of the 10 adapters (8 on video, 2 on text tokens) casts its input
    # itself and keeps that fp32 copy and A's fp32 output: 4·(in + r) per token.
    own_video, own_text = 4 * (6 * (64 + 4) + (64 + 4) + (128 + 4)), 4 * 2 * (64 + 4)
    # bf16 LoRA keeps the block's own bf16 norm1/2/3 and GELU outputs, shared, and its bf16 A outputs.
    shared_video, shared_text = 2 * (3 * 64 + 128 + 8 * 4), 2 * 2 * 4
    fp32, bf16 = (block_saved_bytes(toy_shape, TOY_WORK, PRECISIONS[p]) for p in ("fp32-lora", "deepspeed-bf16"))
    assert fp32 - bf16 == 24 * (own_video - shared_video) + 12 * (own_text - shared_text)


# Made-up counts that make the hand arithmetic easy.
COUNTS = {"dit_params": 8000, "lora_params": 800, "text_encoder_params": 1600, "vae_params": 80}


def _state(training: Training, encoders: bool = True) -> dict[str, int]:
    shape = dataclasses.replace(model_shape(TOY, count_encoders=False), **COUNTS)
    return {name: item.bytes for name, item in state_memory(shape, training, encoders).items()}


def test_zero_sharding_divides_only_the_right_terms():
    by_stage = {stage: _state(Training(8, stage, model_bytes=2)) for stage in range(4)}
    # bf16 weights; the VAE stays fp32 (build.py) unless ZeRO-3's bf16 mode casts and partitions it.
    frozen = {"DiT weights": 8000 * 2, "umT5 weights": 1600 * 2, "VAE weights": 80 * 4}
    # DDP: everything whole; LoRA, its gradients and AdamW m, v in fp32, the weights are their own master.
    ddp = {"LoRA weights": 3200, "LoRA gradients": 3200, "optimiser state": 6400}
    assert by_stage[0] == {**frozen, **ddp}
    # DeepSpeed's bf16 mode casts LoRA to bf16 too. ZeRO-1 shards the optimiser state (m, v and the fp32
    # master: 12 B/param) ...
    assert by_stage[1] == {**frozen, "LoRA weights": 1600, "LoRA gradients": 1600, "optimiser state": 1200}
    # ... ZeRO-2 the gradients too ...
    assert by_stage[2] == {**frozen, "LoRA weights": 1600, "LoRA gradients": 200, "optimiser state": 1200}
    # ... and ZeRO-3 every weight, frozen ones included, the VAE's in bf16.
    sharded = {name: value // 8 for name, value in {**frozen, "VAE weights": 80 * 2}.items()}
    assert by_stage[3] == {**sharded, "LoRA weights": 200, "LoRA gradients": 200, "optimiser state": 1200}


def test_state_dtypes_follow_model_dtype_and_deepspeed_precision():
    # A float32 model in fp32 training: 4 B weights and gradients, fp32 m and v.
    fp32 = _state(Training(8, 2, model_bytes=4, half_precision=False), encoders=False)
    assert fp32 == {"DiT weights": 32000, "LoRA weights": 3200, "LoRA gradients": 400, "optimiser state": 1200}
    # DeepSpeed's bf16 mode casts a float32 model to bf16; DDP with bf16 autocast leaves it float32.
    assert _state(Training(8, 2, model_bytes=4, half_precision=True))["DiT weights"] == 16000
    assert _state(Training(8, 0, model_bytes=4, half_precision=True))["optimiser state"] == 800 * 2 * 4
    # A bf16 model without DeepSpeed's bf16 mode: float32 LoRA; ZeRO-3 updates fp32 partitions in place.
    zero3 = _state(Training(8, 3, model_bytes=2, half_precision=False), encoders=False)
    assert zero3 == {"DiT weights": 2000, "LoRA weights": 400, "LoRA gradients": 400, "optimiser state": 800}
    # One GPU shards nothing, whatever the stage.
    assert _state(Training(1, 3, model_bytes=2))["LoRA gradients"] == 1600


def test_the_lora_ema_is_counted_as_each_rank_holds_it():
    """`LoraEma` keeps a float32 average: of the whole LoRA without ZeRO, of this rank's fragment of the fp32
    masters under ZeRO-1/2/3 (`training/ema.py`); a config without optim.ema_decay has no such row."""
    ema = {stage: _state(Training(8, stage, model_bytes=2, ema=True))["LoRA EMA"] for stage in range(4)}
    assert ema == {0: 800 * 4, 1: 400, 2: 400, 3: 400}
    assert _state(Training(1, 2, model_bytes=2, ema=True))["LoRA EMA"] == 800 * 4
    assert "LoRA EMA" not in _state(Training(8, 2, model_bytes=2))
    # What the config turns on, and the plan prints.
    assert config_training(load_config("smoke", ["optim.ema_decay=0.999"])).ema
    assert not config_training(load_config("smoke")).ema


def test_plan_prints_the_ema_of_a_config_that_keeps_one(capsys):
    argv = ["plan", "smoke", "model=wan14b", "model.lora.rank=256", "--zero", "2", "--gpus", "8", "--no-encoders"]
    assert main([*argv, "optim.ema_decay=0.999"]) == 0
    # 1,226,833,920 LoRA parameters × 4 B ÷ 8 GPUs.
    (row,) = (line for line in capsys.readouterr().out.splitlines() if "LoRA EMA" in line)
    assert "fp32 average (optim.ema_decay), sharded /8" in row and "0.571" in row


def test_vae_weights_are_bf16_only_under_zero3s_bf16_mode():
    """DeepSpeed's bf16 mode casts the VAE with the rest; ZeRO-2 casts it back to float32 after building the engine
    (`LoraDeepSpeedStrategy.setup`), ZeRO-3 partitions it and it stays bf16."""
    shape = dataclasses.replace(model_shape(TOY, count_encoders=False), **COUNTS)
    rows = {
        (stage, half): state_memory(shape, Training(8, stage, model_bytes=2, half_precision=half))["VAE weights"]
        for stage in (0, 2, 3)
        for half in (False, True)
    }
    assert {key: (row.bytes, row.note) for key, row in rows.items()} == {
        (0, False): (320, "frozen, fp32, replicated"),
        (0, True): (320, "frozen, fp32, replicated"),
        (2, False): (320, "frozen, fp32, replicated"),
        (2, True): (320, "frozen, fp32, replicated"),
        (3, False): (40, "frozen, fp32, sharded /8"),
        (3, True): (20, "frozen, bf16, sharded /8"),
    }


def test_checkpointing_trades_activation_memory_for_one_recompute_forward(toy_shape):
    shape = dataclasses.replace(toy_shape, num_layers=40)
    work = dataclasses.replace(TOY_WORK, micro_batch=2)
    off, on = (dataclasses.replace(work, checkpointing=flag) for flag in (False, True))
    training = Training()
    block = block_saved_bytes(shape, work, training)
    memory_off, memory_on = activation_memory(shape, off, training), activation_memory(shape, on, training)
    assert memory_off["saved tensors"].bytes == 40 * block * 2
    assert memory_on["block inputs"].bytes == 40 * 24 * 64 * 2 * 2  # n_l x T x D x bf16 x micro-batch
    assert memory_on["one block recomputed"].bytes == block * 2
    total = {name: sum(item.bytes for item in m.values()) for name, m in (("off", memory_off), ("on", memory_on))}
    assert total["on"] < total["off"]
    flops_off, flops_on = training_flops(shape, off), training_flops(shape, on)
    assert flops_on.recompute == flops_on.forward and flops_on.forward == flops_off.forward
    assert flops_on.total - flops_off.total == sum(flops_off.forward.values())


def test_wan14b_counts_and_480p_tokens():
    shape = model_shape(load_config(overrides=["model=wan14b"]).model, count_encoders=False)
    assert shape.dit_params == 14_288_491_584 and round(shape.dit_params / 1e9, 2) == 14.29
    assert (shape.num_layers, shape.dim, shape.ffn_dim) == (40, 5120, 13824)
    assert 11 * tokens_per_frame(*parse_resolution("480x832"), "test") == 17_160
    assert tokens_per_frame(*parse_resolution("192p"), "test") == 12 * 21 == 252


def test_resolution_and_strategy_parsing():
    assert parse_resolution("480p") == (480, 832) and parse_resolution("64x112") == (64, 112)
    for bad in ("480x830", "big", "0x16"):
        with pytest.raises(ConfigError, match="--resolution"):
            parse_resolution(bad)
    assert [zero_stage(s) for s in ("deepspeed_stage_2", "deepspeed_stage_3", "ddp", "auto")] == [2, 3, 0, 0]


def test_cli_prints_the_table(capsys):
    argv = ["plan", "smoke", "model=wan14b", "model.lora.rank=256", "--resolution", "480x832"]
    assert main([*argv, "--zero", "2", "--gpus", "8", "--checkpointing", "--no-encoders"]) == 0
    out = capsys.readouterr().out
    for expected in ("14,288,491,584", "1,226,833,920", "17,160", "5,632", "DeepSpeed ZeRO-2", "sharded /8"):
        assert expected in out
    # --no-encoders: umT5 and the VAE are counted as parameters but not resident in memory.
    assert "5,680,910,336" in out and "umT5 weights" not in out
    assert out.index("Memory per GPU") < out.index("What this cannot know")


def test_plan_states_the_text_len_trade_off_and_pretrained_models_keep_512(capsys):
    assert main(["plan", "smoke", "model=wan1_3b", "model.text_len=128", "--resolution", "192p"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "A smaller text_len cuts the cross-attention cost but is not free with pretrained weights" in out
    assert "Wan attends to its padding" in out
    for model in ("wan1_3b", "wan14b"):
        assert load_config(overrides=[f"model={model}"]).model.text_len == 512


def test_cli_unknown_experiment_and_bad_option_exit_2_with_one_line(capsys):
    assert main(["plan", "no_such_experiment"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no_such_experiment" in err
    assert main(["plan", "smoke", "--shots", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dreamshot plan: error: --shots must be >= 1, got 0"


def test_plan_fits_the_memory_training_plans_for(capsys):
    """Training windows long storyboards by `trainer.device_memory_gib`; the plan prints the fit in the same GiB
    unless --gpu-memory says otherwise."""
    assert main(["plan", "smoke", "trainer.device_memory_gib=40"]) == 0
    out = capsys.readouterr().out
    assert "headroom on 40 GiB" in out and "Longest storyboard in 40 GiB" in out
    assert main(["plan", "smoke", "trainer.device_memory_gib=40", "--gpu-memory", "24"]) == 0
    assert "Longest storyboard in 24 GiB" in capsys.readouterr().out
