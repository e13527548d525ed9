"""HDR (PQ or HLG) pictures to SDR BT.709, for the keyframes of phone HDR footage.

A PQ or HLG signal shown as if it were SDR looks washed out: grey, flat, with pale colours. This is FFmpeg's
usual conversion (`zscale=t=linear:npl=100, zscale=p=bt709, tonemap=hable:desat=0, zscale=t=bt709`) in
numpy, since PyAV's FFmpeg has the `tonemap` filter but not `zscale`, and its swscale converts the transfer
and primaries but clips every highlight to white:

1. the non-linear R'G'B' signal to display light in cd/m²: PQ's EOTF (SMPTE ST 2084), or HLG's inverse OETF
   and its OOTF (ITU-R BT.2100: a 1000 cd/m² display, system gamma 1.2);
2. divided by 100 cd/m², FFmpeg's reference white: 1.0 is SDR white;
3. BT.2020 primaries to BT.709 (ITU-R BT.2087, linear light), for a BT.2020 signal;
4. Hable's filmic curve on each pixel's largest component, scaled so that the signal's peak maps to 1, the
   pixel's components scaled by the same factor (hue and saturation kept, as FFmpeg's `tonemap`);
5. clipped to [0, 1] (colours outside BT.709) and coded with BT.709's OETF, as 8-bit.
"""

from __future__ import annotations

import math

import numpy as np

# FFmpeg's reference white (cd/m²): display light is divided by it, so SDR white is 1.0.
REFERENCE_WHITE = 100.0
# Peak light (cd/m²) of a signal without metadata that says otherwise (FFmpeg's ff_determine_signal_peak):
# PQ can code up to 10000; HLG is defined for a 1000 cd/m² display.
DEFAULT_PEAK = {"pq": 10000.0, "hlg": 1000.0}
# SMPTE ST 2084 constants.
_M1, _M2 = 2610 / 16384, 2523 / 4096 * 128
_C1, _C2, _C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
# ITU-R BT.2100 HLG constants, the nominal display peak (cd/m²) and its system gamma.
_A = 0.17883277
_B, _C = 1 - 4 * _A, 0.5 - _A * math.log(4 * _A)
_HLG_PEAK, _HLG_GAMMA = 1000.0, 1.2
# BT.2020 luminance weights (HLG's OOTF acts on luminance).
_BT2020_LUMA = np.array([0.2627, 0.6780, 0.0593], np.float32)
# Linear BT.2020 RGB to linear BT.709 RGB (ITU-R BT.2087); each row sums to 1, so white stays white. The
# constants are float32, so that a float32 picture is converted in float32 (a 1080p frame in under half a second).
BT2020_TO_BT709 = np.array(
    [
        [1.660491, -0.587641, -0.072850],
        [-0.124550, 1.132900, -0.008349],
        [-0.018151, -0.100579, 1.118730],
    ],
    np.float32,
)


def pq_eotf(signal: np.ndarray) -> np.ndarray:
    """PQ signal values in [0, 1] to display light in cd/m² (0 to 10000)."""
    power = np.power(np.clip(signal, 0.0, 1.0), 1 / _M2)
    return 10000.0 * np.power(np.maximum(power - _C1, 0.0) / (_C2 - _C3 * power), 1 / _M1)


def hlg_display_light(rgb: np.ndarray) -> np.ndarray:
    """HLG R'G'B' signal values in [0, 1], (..., 3), to display light in cd/m² on a 1000 cd/m² display: the
    inverse OETF to scene light in [0, 1], then the OOTF, which raises the scene's luminance to gamma 1.2."""
    signal = np.clip(rgb, 0.0, 1.0)
    scene = np.where(signal <= 0.5, signal**2 / 3, (np.exp((signal - _C) / _A) + _B) / 12)
    luminance = scene @ _BT2020_LUMA
    return _HLG_PEAK * np.power(luminance, _HLG_GAMMA - 1)[..., None] * scene


def hable(x: np.ndarray | float) -> np.ndarray:
    """John Hable's filmic curve (Uncharted 2), as FFmpeg's tonemap=hable uses it (not normalised)."""
    a, b, c, d, e, f = 0.15, 0.50, 0.10, 0.20, 0.02, 0.30
    return (x * (a * x + c * b) + d * e) / (x * (a * x + b) + d * f) - e / f


def tone_map(linear: np.ndarray, peak: float) -> np.ndarray:
    """Linear RGB (..., 3), 1.0 = SDR white, into [0, 1] with Hable's curve on each pixel's largest component,
    normalised so that `peak` (in the same unit) maps to 1; the components keep their ratios."""
    signal = np.maximum(linear.max(axis=-1, keepdims=True), 1e-6)
    return linear * (hable(signal) / hable(peak) / signal)


def bt709_oetf(linear: np.ndarray) -> np.ndarray:
    """BT.709's transfer function on linear values in [0, 1]."""
    return np.where(linear < 0.018, 4.5 * linear, 1.099 * np.power(np.maximum(linear, 0.018), 0.45) - 0.099)


def hdr_to_sdr(rgb: np.ndarray, transfer: str, peak: float, bt2020: bool = True) -> np.ndarray:
    """A PQ or HLG (`transfer`: pq | hlg) R'G'B' picture (H, W, 3), values in [0, 1], to SDR BT.709 RGB uint8
    (see the module docstring). `peak`: the signal's peak light in cd/m² (`DEFAULT_PEAK` without metadata);
    `bt2020`: whether its primaries are BT.2020's (else BT.709's, left as they are)."""
    light = pq_eotf(rgb) if transfer == "pq" else hlg_display_light(rgb)
    linear = light / REFERENCE_WHITE
    if bt2020:
        linear = linear @ BT2020_TO_BT709.T
    mapped = np.clip(tone_map(linear, peak / REFERENCE_WHITE), 0.0, 1.0)
    return np.round(bt709_oetf(mapped) * 255).astype(np.uint8)
