"""The offline watermark detector (`quality.overlay: corner_logo`): a mark burnt into a corner of the video.

A logo stays where it is while the footage under it changes, so its edges are at the same pixels in
nearly every keyframe of a video, and shot content's edges are not. Edges (Canny, on the luma at a fixed
width) present in at least `persistence` of the keyframes, inside one of the four corner boxes, are the
candidate mark; it counts as a logo only when it spans some height and width (a letterbox border or a
horizon is a line). Subtitles change from shot to shot and need a text detector behind the same interface.
"""

from __future__ import annotations

import cv2
import numpy as np

WIDTH = 320


class CornerLogoDetector:
    """`OverlayDetector`: flags the keyframes that show a static corner logo as "watermark"."""

    def __init__(self, persistence: float = 0.8, corner: float = 0.25, min_extent: float = 0.02) -> None:
        self.persistence, self.corner, self.min_extent = persistence, corner, min_extent

    def detect(self, images: list[np.ndarray]) -> list[str | None]:
        # Fewer keyframes cannot tell a static mark from content that happens to repeat.
        if len(images) < 3:
            return [None] * len(images)
        edges = np.stack([_edges(image) for image in images])
        logo = self._logo(edges.mean(axis=0) >= self.persistence)
        if not logo.any():
            return [None] * len(images)
        # A keyframe shows the logo where most of its pixels are edges there too.
        shown = (edges & logo).sum(axis=(1, 2)) >= 0.5 * logo.sum()
        return ["watermark" if s else None for s in shown]

    def _logo(self, persistent: np.ndarray) -> np.ndarray:
        """The persistent edge pixels of the corners that hold a mark with extent in both directions."""
        height, width = persistent.shape
        box_h, box_w = round(height * self.corner), round(width * self.corner)
        logo = np.zeros_like(persistent)
        for rows in (slice(0, box_h), slice(height - box_h, height)):
            for cols in (slice(0, box_w), slice(width - box_w, width)):
                ys, xs = np.nonzero(persistent[rows, cols])
                if len(ys) and np.ptp(ys) + 1 >= self.min_extent * width and np.ptp(xs) + 1 >= self.min_extent * width:
                    logo[rows, cols] = persistent[rows, cols]
        return logo


def _edges(image: np.ndarray) -> np.ndarray:
    """Canny edges (h, w) bool of an RGB image resized to WIDTH (all keyframes of a video share a size)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    height = max(1, round(grey.shape[0] * WIDTH / grey.shape[1]))
    grey = cv2.resize(grey, (WIDTH, height), interpolation=cv2.INTER_AREA)
    return cv2.Canny(grey, 50, 150) > 0
