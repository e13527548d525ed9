"""Flow-matching maths (DESIGN Eq. 3-4)."""

import torch

from dreamshot.diffusion.flow_matching import (
    add_noise,
    frame_masked_mse,
    frame_timesteps,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)


def test_shift_fixes_endpoints_and_moves_mass_to_noise():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    shifted = shift_timesteps(t, 3.0)
    assert torch.allclose(shifted[[0, 3]], torch.tensor([0.0, 1.0]))
    assert torch.allclose(shifted[2], torch.tensor(0.75))  # 3*0.5 / (1 + 2*0.5)
    assert torch.equal(shift_timesteps(t, 1.0), t)


def test_sample_timesteps_seeded_and_in_range():
    a = sample_timesteps(64, 3.0, torch.Generator().manual_seed(1))
    b = sample_timesteps(64, 3.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (64,)
    assert (a > 0).all() and (a < 1).all() and a.mean() > 0.5  # shift > 1 favours noise


def test_noise_interpolation_and_velocity():
    z0, eps = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    t = torch.tensor([0.0, 1.0])
    zt = add_noise(z0, eps, t)
    assert torch.equal(zt[0], z0[0]) and torch.equal(zt[1], eps[1])
    # Following the velocity from z_t for time t lands on the data: z_t - t·v = z_0.
    t = torch.tensor([0.3, 0.7])
    zt = add_noise(z0, eps, t)
    v = velocity_target(z0, eps)
    assert torch.allclose(zt - t.view(-1, 1, 1, 1, 1) * v, z0, atol=1e-6)


def test_masked_mse_ignores_condition_frames():
    target = torch.randn(2, 4, 5, 2, 2)
    pred = target.clone()
    frames = torch.tensor([False, False, True, True, True])
    pred[:, :, :2] += 100.0  # wildly wrong prediction on the two clean reference frames
    assert frame_masked_mse(pred, target, frames) == 0
    pred[:, :, 3] += 1.0
    assert torch.isclose(frame_masked_mse(pred, target, frames), torch.tensor(1 / 3))


def test_frame_timesteps_zero_on_clean_frames():
    t = torch.tensor([0.5, 0.25])
    frames = torch.tensor([False, True, True])
    ts = frame_timesteps(t, frames)
    assert ts.tolist() == [[0, 500, 500], [0, 250, 250]]


def test_bf16_latents_are_noised_and_targeted_in_float32():
    """Under DeepSpeed's bf16 the latents and the noise arrive in bf16. z_t must be Eq. 3 at the t the DiT is told
    (float32), rounded once to bf16, and the target the exact ε − z_0: checked against float64 re-implementations."""
    g = torch.Generator().manual_seed(0)
    z0, eps = (torch.randn(4, 16, 3, 8, 8, generator=g).bfloat16() for _ in range(2))
    t = torch.tensor([0.3, 0.6113, 0.9973, 0.05])  # none of them a bf16 value
    t64 = t.double().view(-1, 1, 1, 1, 1)
    exact = (1 - t64) * z0.double() + t64 * eps.double()
    zt = add_noise(z0, eps, t)
    assert zt.dtype == torch.bfloat16
    # One rounding to bf16 (8 significant bits) lands within 2^-8 of the exact value, relatively.
    assert ((zt.double() - exact).abs() <= exact.abs() * 2**-8 * (1 + 2**-10)).all()
    target = velocity_target(z0, eps)
    torch.testing.assert_close(target.double(), eps.double() - z0.double(), atol=1e-30, rtol=2**-23)
