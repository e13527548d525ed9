"""Reference-free guidance (Eq. 9) and its t2s reduction to ordinary CFG."""

from __future__ import annotations

import pytest
import torch

from dreamshot.diffusion.guidance import classifier_free_guidance, guided_velocity, reference_free_guidance


def test_eq9_by_hand():
    v_u, v_r, v_c = torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.0]), torch.tensor([4.0, 1.0])
    # 1 + 4·(2 − 1) + 5·(4 − 2) = 15;  −2 + 4·(0 + 2) + 5·(1 − 0) = 11
    torch.testing.assert_close(reference_free_guidance(v_u, v_r, v_c), torch.tensor([15.0, 11.0]))
    # 1 + 2·1 + 0.5·2 = 4
    assert reference_free_guidance(v_u, v_r, v_c, omega1=2.0, omega2=0.5)[0].item() == pytest.approx(4.0)


def test_cfg_by_hand():
    assert classifier_free_guidance(torch.tensor(1.0), torch.tensor(3.0), 5.0).item() == pytest.approx(11.0)


def test_unit_weights_give_the_conditional_prediction():
    v_u, v_r, v_c = torch.randn(3, 2, 16, 3, 4, 6).unbind(0)
    torch.testing.assert_close(reference_free_guidance(v_u, v_r, v_c, 1.0, 1.0), v_c)
    torch.testing.assert_close(classifier_free_guidance(v_u, v_c, 1.0), v_c)


def test_t2s_reduces_to_cfg_with_omega2():
    v_u, v_c = torch.randn(2, 1, 16, 3, 4, 6).unbind(0)
    cfg = classifier_free_guidance(v_u, v_c, 7.0)
    torch.testing.assert_close(guided_velocity(v_u, v_c, None, omega1=3.0, omega2=7.0), cfg)
    # Eq. 9 itself, with the references branch equal to the unconditioned one, is the same CFG, whatever ω1.
    for omega1 in (0.0, 3.0, 10.0):
        torch.testing.assert_close(reference_free_guidance(v_u, v_u, v_c, omega1, 7.0), cfg)


def test_guided_velocity_with_references_is_eq9():
    v_u, v_r, v_c = torch.randn(3, 1, 16, 2, 4, 6).unbind(0)
    torch.testing.assert_close(
        guided_velocity(v_u, v_c, v_r, omega1=4.0, omega2=5.0), reference_free_guidance(v_u, v_r, v_c, 4.0, 5.0)
    )
    assert not torch.allclose(guided_velocity(v_u, v_c, v_r), guided_velocity(v_u, v_c, None))
