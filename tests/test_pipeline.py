"""StoryboardPipeline on the tiny Wan: modes, batched guidance branches, clean conditions, determinism."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import WanPipeline

from dreamshot.config.schema import Config
from dreamshot.diffusion.flow_matching import frame_timesteps
from dreamshot.inference.loading import build_adapter
from dreamshot.inference.pipeline import StoryboardPipeline, StoryboardRequest, build_scheduler, initial_noise
from dreamshot.models.layout import StoryboardLayout
from dreamshot.models.wan.build import build_components
from dreamshot.models.wan.latents import decode_shots, encode_references, encode_shots
from dreamshot.utils.errors import ConfigError

SIZE = (32, 48)
SHOTS = ["Close-up: <Role 1> on the left.", "Wide shot: <Role 2> in the centre."]


@pytest.fixture(scope="module")
def adapter():
    return build_adapter(Config())


@pytest.fixture
def calls(adapter, monkeypatch):
    """Every predict_velocity call of the adapter: its inputs, cloned."""
    calls = []
    original = adapter.predict_velocity

    def record(latents, timesteps, text, layout, **kwargs):
        calls.append(SimpleNamespace(latents=latents.clone(), timesteps=timesteps.clone(), text=text, layout=layout))
        return original(latents, timesteps, text, layout, **kwargs)

    monkeypatch.setattr(adapter, "predict_velocity", record)
    return calls


def config(steps: int = 2, **overrides) -> Config:
    cfg = Config()
    cfg.inference.steps = steps
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, *SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def r2s_request() -> StoryboardRequest:
    return StoryboardRequest(SHOTS, SIZE, images(2, 1), ["<Role 1>: a red star", "<Role 2>: a blue circle"])


def s2s_request() -> StoryboardRequest:
    return StoryboardRequest(
        SHOTS, SIZE, images(1, 1), ["<Role 1>: a red star"], images(2, 2), ["Wide shot: first.", "Close-up: second."]
    )


def test_result_shapes_and_range(adapter):
    result = StoryboardPipeline(adapter, config())(StoryboardRequest(SHOTS, SIZE), seed=0, progress=False)
    assert result.mode == "t2s" and result.seed == 0
    assert result.images.shape == (2, 3, *SIZE)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert result.latents.shape == (1, 16, 2, SIZE[0] // 8, SIZE[1] // 8)
    assert len(result.step_seconds) == 2 and result.total_seconds >= sum(result.step_seconds)


def test_same_seed_same_storyboard(adapter):
    pipeline = StoryboardPipeline(adapter, config())
    first = pipeline(r2s_request(), seed=3, progress=False)
    again = pipeline(r2s_request(), seed=3, progress=False)
    other = pipeline(r2s_request(), seed=4, progress=False)
    torch.testing.assert_close(first.latents, again.latents, rtol=0, atol=0)
    torch.testing.assert_close(first.images, again.images, rtol=0, atol=0)
    assert not torch.allclose(first.latents, other.latents)


def test_t2s_runs_unconditioned_and_conditioned_as_one_batch(adapter, calls):
    StoryboardPipeline(adapter, config(steps=3))(StoryboardRequest(SHOTS, SIZE), progress=False)
    assert [c.latents.shape[0] for c in calls] == [2, 2, 2]
    assert all(c.layout.num_conditions == 0 for c in calls)
    # The frames' texts, as indices into the storyboard's distinct texts (the shots', then the negative prompt's):
    # row 0 is the negative prompt on every shot (v_u), row 1 the shot prompts (v_c).
    assert calls[0].text.frames.tolist() == [[2, 2], [0, 1]]


def test_r2s_batches_the_two_branches_with_references(adapter, calls):
    StoryboardPipeline(adapter, config(steps=2))(r2s_request(), progress=False)
    assert [(c.latents.shape[0], c.layout.num_conditions) for c in calls] == [(2, 2), (1, 0), (2, 2), (1, 0)]
    # Distinct texts: the 2 references', the 2 shots', the negative prompt. v_r and v_c share the references'
    # own prompts and differ in the shot texts only; v_u (no references) sees the same negative prompt as v_r.
    assert calls[0].text.frames.tolist() == [[0, 1, 4, 4], [0, 1, 2, 3]]
    assert calls[1].text.frames.tolist() == [[4, 4]]


@pytest.mark.parametrize("layout", ["refs_first", "last"])
def test_s2s_conditions_stay_clean_at_timestep_zero(adapter, calls, layout):
    request = s2s_request()
    StoryboardPipeline(adapter, config(steps=3, storyboard__layout=layout))(request, progress=False)
    expected = torch.cat(
        [
            encode_references(adapter.vae, request.references[None]),
            encode_shots(adapter.vae, request.given_shots[None]),
        ],
        dim=2,
    )
    conditioned = [c for c in calls if c.layout.num_conditions]
    assert len(conditioned) == 3
    for call in conditioned:
        assert call.layout.num_conditions == 3 and call.layout.position_mode == layout
        conditions, targets = call.layout.split(call.latents)
        for row in conditions:
            torch.testing.assert_close(row[None], expected, rtol=0, atol=0)
        per_frame = call.timesteps
        assert per_frame.shape == (call.latents.shape[0], 5)
        assert (per_frame[:, call.layout.condition_slice()] == 0).all()
        assert (per_frame[:, call.layout.target_slice()] > 0).all()


def test_unit_guidance_one_euler_step_is_one_conditional_prediction(adapter):
    """ω1 = ω2 = 1 leaves v_c; one Euler step from σ = 1 to 0 gives noise − v_c(noise, t = 1)."""
    cfg = config(steps=1, inference__omega1=1.0, inference__omega2=1.0, inference__scheduler="euler")
    request = r2s_request()
    result = StoryboardPipeline(adapter, cfg)(request, seed=5, progress=False)

    noise = initial_noise((1, 16, 2, SIZE[0] // 8, SIZE[1] // 8), 5)
    layout = StoryboardLayout.of(2, 2)
    refs = encode_references(adapter.vae, request.references[None])
    text = adapter.encode_text([request.reference_texts + request.shot_texts])
    timesteps = frame_timesteps(torch.ones(1), layout.target_frames())
    with torch.no_grad():
        velocity = adapter.predict_velocity(layout.assemble(refs, noise), timesteps, text, layout)
    torch.testing.assert_close(result.latents, noise - layout.split(velocity)[1], rtol=1e-4, atol=1e-4)


def test_global_timestep_mode_gives_one_timestep_per_sample(adapter, calls):
    StoryboardPipeline(adapter, config(diffusion__timestep_mode="global"))(r2s_request(), progress=False)
    assert all(c.timesteps.shape == (c.latents.shape[0],) for c in calls)
    assert calls[0].timesteps[0] > 0


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().add(1).div(2).clamp(0, 1)


@pytest.mark.parametrize(
    ("given_positions", "shot_positions"),
    [([0, 1], [2, 3]), ([0, 2], [1, 3])],
    ids=["continuation", "middle re-roll"],
)
def test_drawn_shots_are_decoded_in_the_stream_of_the_given_shots(adapter, given_positions, shot_positions):
    """Training encodes one shot stream: a shot after the first is a 4-frame-group latent, so it is decoded with
    the shots before it, not alone through the VAE's first-frame path."""
    request = s2s_request()
    request.given_positions, request.shot_positions = given_positions, shot_positions
    result = StoryboardPipeline(adapter, config())(request, seed=1, progress=False)
    given = encode_shots(adapter.vae, request.given_shots[None])
    latents = {p: given[:, :, i] for i, p in enumerate(given_positions)}
    latents.update({p: result.latents[:, :, i] for i, p in enumerate(shot_positions)})
    stream = decode_shots(adapter.vae, torch.stack([latents[p] for p in range(4)], dim=2))[0]
    torch.testing.assert_close(result.images, _to_unit(stream[shot_positions]), rtol=0, atol=1e-6)
    alone = _to_unit(decode_shots(adapter.vae, result.latents)[0])
    assert (alone - result.images).abs().max() > 0.1


def test_a_condition_set_the_mix_never_trained_is_refused_before_sampling(adapter, calls):
    cfg = config()
    cfg.storyboard.modes.r2s, cfg.storyboard.modes.r2s_s2s = 0.65, 0.0
    with pytest.raises(ConfigError, match="storyboard.modes.r2s_s2s"):
        StoryboardPipeline(adapter, cfg)(s2s_request(), progress=False)
    assert not calls
    assert s2s_request().mode == "r2s_s2s" and r2s_request().mode == "r2s"


def test_request_checks_counts():
    with pytest.raises(ValueError, match="references: 2 images but 1 texts"):
        StoryboardRequest(SHOTS, SIZE, images(2, 0), ["one"])


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_one_t2s_shot_is_what_diffusers_wan_pipeline_draws_with_cfg_omega2(adapter, scheduler):
    # One shot, no conditions: Eq. 9 is ordinary CFG with ω2, and the sampler must be diffusers' own Wan sampler.
    cfg = config(steps=3, inference__scheduler=scheduler, inference__omega2=3.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        parts = build_components(cfg.model)
    pipe = WanPipeline(
        tokenizer=parts.tokenizer,
        text_encoder=parts.text_encoder,
        vae=parts.vae,
        transformer=parts.transformer,
        scheduler=build_scheduler(scheduler, cfg.inference.shift),
    )
    ours = StoryboardPipeline(adapter, cfg)(StoryboardRequest(SHOTS[:1], SIZE), seed=5, progress=False).latents
    theirs = pipe(
        prompt=SHOTS[0],
        negative_prompt=cfg.storyboard.negative_prompt,
        height=SIZE[0],
        width=SIZE[1],
        num_frames=1,
        num_inference_steps=3,
        guidance_scale=3.0,
        latents=initial_noise(tuple(ours.shape), 5),
        max_sequence_length=cfg.model.text_len,
        output_type="latent",
    ).frames
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
