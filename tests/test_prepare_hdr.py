"""HDR (PQ, HLG) keyframes are tone-mapped to SDR BT.709: the conversion's maths on known values, and a 10-bit
HDR video's keyframes."""

from __future__ import annotations

import av
import numpy as np
import pytest

from dreamshot.prepare.config import load_prepare_config
from dreamshot.prepare.hdr import (
    BT2020_TO_BT709,
    DEFAULT_PEAK,
    hable,
    hdr_to_sdr,
    hlg_display_light,
    pq_eotf,
    tone_map,
)
from dreamshot.prepare.keyframes import score_frames
from dreamshot.prepare.stage import VideoJob
from dreamshot.prepare.toyvideo import toy_overrides
from dreamshot.prepare.video import read_frames, reading_corrections, static_peak

CFG = load_prepare_config(overrides=toy_overrides())
# PQ signal values of 100 and 1000 cd/m² (SMPTE ST 2084's table).
PQ_100, PQ_1000 = 0.508078, 0.751827
# Hable's curve at SDR white over its value at a 1000 cd/m² peak (10x white), BT.709-coded: 0.31245 -> 140.8.
SDR_WHITE_UNDER_1000 = 141


def test_pq_and_hlg_signals_give_their_known_display_light():
    np.testing.assert_allclose(pq_eotf(np.array([0.0, PQ_100, PQ_1000, 1.0])), [0, 100, 1000, 10000], atol=0.01)
    # HLG at 75% is BT.2408's reference white on a 1000 cd/m² display, 203 cd/m²; 100% is the display's peak.
    light = hlg_display_light(np.array([[0.75] * 3, [1.0] * 3, [0.0] * 3]))
    np.testing.assert_allclose(light[:, 0], [203.0, 1000.0, 0.0], atol=0.5)
    # The OOTF acts on luminance: a colour keeps its ratios of scene light.
    colour = hlg_display_light(np.array([0.9, 0.5, 0.25]))
    scene = np.array([(np.exp((0.9 - 0.55991073) / 0.17883277) + 0.28466892) / 12, 0.25 / 3, 0.0625 / 3])
    np.testing.assert_allclose(colour / colour[1], scene / scene[1], rtol=1e-6)


def test_bt2020_primaries_become_bt709_and_white_stays_white():
    np.testing.assert_allclose(np.ones(3) @ BT2020_TO_BT709.T, np.ones(3), atol=1e-5)
    green = np.array([0.0, 1.0, 0.0]) @ BT2020_TO_BT709.T
    assert green[0] < 0 and green[2] < 0  # BT.2020's green lies outside BT.709


def test_tone_map_brings_the_peak_to_one_and_keeps_hue():
    linear = np.array([[10.0, 10.0, 10.0], [1.0, 1.0, 1.0], [0.1, 0.1, 0.1], [4.0, 2.0, 1.0]])
    mapped = tone_map(linear, peak=10.0)
    np.testing.assert_allclose(mapped[0], 1.0)
    assert mapped[2, 0] < mapped[1, 0] < mapped[0, 0]
    np.testing.assert_allclose(mapped[1], hable(1.0) / hable(10.0))
    np.testing.assert_allclose(mapped[3] / mapped[3, 0], [1.0, 0.5, 0.25])


def test_hdr_to_sdr_maps_known_values():
    picture = np.array([[[PQ_100] * 3, [PQ_1000] * 3, [0.0] * 3]])
    np.testing.assert_array_equal(hdr_to_sdr(picture, "pq", peak=1000.0)[0, :, 0], [SDR_WHITE_UNDER_1000, 255, 0])
    # Without metadata PQ's peak is 10000 cd/m²: the same light comes out darker, the peak still white.
    darker = hdr_to_sdr(np.array([[[PQ_1000] * 3, [1.0] * 3]]), "pq", peak=DEFAULT_PEAK["pq"])
    assert darker[0, 0, 0] < 230 and darker[0, 1, 0] == 255
    hlg = hdr_to_sdr(np.array([[[0.75] * 3, [1.0] * 3]]), "hlg", peak=DEFAULT_PEAK["hlg"])
    assert hlg[0, 1, 0] == 255 and 150 < hlg[0, 0, 0] < 200


def _hdr_video(path, trc: int, signal: tuple[float, float], params: str = "") -> None:
    """A 10-bit H.264 video flagged BT.2020 and transfer `trc`, of neutral frames whose left half has the signal
    value signal[0] and right half signal[1] (x264's `params`, e.g. content light level)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 64, 128, "yuv420p10le"
        context = stream.codec_context
        context.color_trc, context.color_primaries, context.colorspace, context.color_range = trc, 9, 9, 1
        stream.options = {"x264-params": ":".join(filter(None, ["log-level=none", params]))}
        rgb = np.zeros((64, 128, 3), np.uint16)
        rgb[:, :64], rgb[:, 64:] = (round(value * 65535) for value in signal)
        picture = av.VideoFrame.from_ndarray(rgb, format="rgb48le")
        for _ in range(4):
            frame = picture.reformat(format="yuv420p10le", dst_colorspace=9, dst_color_range=1)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.parametrize(
    ("trc", "signal", "params", "peak", "expected"),
    [
        # PQ with a content light level of 1000 cd/m² (on the first frame only): 1000 cd/m² is white, 100 is SDR
        # white under it.
        (16, (PQ_1000, PQ_100), "cll=1000,400", 1000.0, (255, SDR_WHITE_UNDER_1000)),
        # HLG without metadata: its 1000 cd/m² display; 100% is white, 75% (203 cd/m²) well below it.
        (18, (1.0, 0.75), "", None, (255, hdr_to_sdr(np.full((1, 1, 3), 0.75), "hlg", 1000.0)[0, 0, 0])),
    ],
)
def test_keyframes_of_hdr_video_are_tone_mapped(tmp_path, trc, signal, params, peak, expected):
    path = tmp_path / "hdr.mp4"
    _hdr_video(path, trc, signal, params)
    assert static_peak(path) == peak
    assert reading_corrections(path) == ({16: "pq", 18: "hlg"}[trc],)  # a folder prepared before redoes it
    scores = score_frames(VideoJob("hdr", path, tmp_path), CFG.keyframes)
    frame = read_frames(path, [2], scores.pts, scores.keys, "auto")[2]
    assert frame.shape == (64, 128, 3)
    # Away from the edge between the halves (chroma is subsampled); the coding is lossy by a level or two.
    assert np.abs(frame[:, 4:56].astype(int) - expected[0]).max() <= 2
    assert np.abs(frame[:, 72:124].astype(int) - expected[1]).max() <= 2
    assert np.abs(frame[:, 72:124].astype(int) - frame[:, 72:124, :1]).max() <= 2  # still neutral
