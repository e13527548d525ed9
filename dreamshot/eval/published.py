"""The paper's published rows (EVAL.md "Published rows"), as printed: CIDS and CSD x100, AES and Alignment on
their own scales. Keyed by (benchmark, mode); each table lists its columns (value names) and its rows."""

from __future__ import annotations

from dataclasses import dataclass

R2S_COLUMNS = ("cids_self", "cids_cross", "csd_self", "csd_cross", "aes", "alignment")
SELF_COLUMNS = ("cids_self", "csd_self", "aes", "alignment")
# Value names printed x100 (cosines); the others keep their scale.
PERCENT = frozenset({"cids_self", "cids_cross", "csd_self", "csd_cross"})
HEADERS = {
    "cids_self": "CIDS self",
    "cids_cross": "CIDS cross",
    "csd_self": "CSD self",
    "csd_cross": "CSD cross",
    "aes": "AES",
    "alignment": "Alignment",
}


@dataclass(frozen=True)
class PublishedTable:
    source: str
    columns: tuple[str, ...]
    rows: dict[str, tuple[float, ...]]
    # The stories the rows were measured on (paper §5.1): the DreamShot test set's 100, ViStoryBench's full 80.
    stories: int


PUBLISHED = {
    ("dreamshot_test", "r2s"): PublishedTable(
        "paper Tab. 1 (DreamShot test set, Reference-to-Shot) and Tab. 3 (ablations)",
        R2S_COLUMNS,
        {
            "Story-Adapter": (36.1, 25.5, 51.9, 36.7, 5.44, 1.84),
            "DreamO": (47.2, 40.0, 58.3, 39.5, 5.45, 3.29),
            "UNO": (38.6, 28.6, 56.2, 40.3, 5.28, 3.27),
            "DreamShot": (48.7, 51.6, 64.5, 45.1, 5.50, 3.39),
            "Phase-Pos (Tab. 3)": (43.6, 20.0, 67.2, 36.2, 5.47, 2.96),
            "Neg-Pos (Tab. 3)": (47.2, 40.9, 60.5, 35.0, 5.20, 3.03),
            "Last-Pos (Tab. 3)": (43.5, 43.5, 65.3, 43.4, 5.53, 3.26),
            "w/o RACL (Tab. 3)": (46.7, 48.3, 64.2, 43.7, 5.49, 3.26),
        },
        stories=100,
    ),
    ("dreamshot_test", "t2s"): PublishedTable(
        "paper Tab. 1 (DreamShot test set, Text-to-Shot)",
        SELF_COLUMNS,
        {
            "Story-Adapter": (45.4, 44.2, 5.41, 1.98),
            "StoryDiffusion": (45.4, 56.9, 5.38, 1.82),
            "Story2Board": (44.4, 62.6, 5.27, 2.95),
            "DreamShot": (46.8, 65.4, 5.46, 3.22),
        },
        stories=100,
    ),
    ("dreamshot_test", "s2s"): PublishedTable(
        "paper Tab. 1 (DreamShot test set, Shot-to-Shot)",
        SELF_COLUMNS,
        {
            "Story-Adapter": (42.2, 52.2, 5.45, 2.27),
            "UNO": (36.7, 55.8, 5.12, 3.28),
            "DreamShot": (40.4, 62.3, 5.46, 3.31),
        },
        stories=100,
    ),
    ("vistorybench", "r2s"): PublishedTable(
        "paper Tab. 2 (ViStoryBench, Reference-to-Shot)",
        R2S_COLUMNS,
        {
            "Story-Adapter": (60.5, 46.0, 54.8, 45.6, 4.99, 2.69),
            "SEED-Story": (58.7, 28.7, 74.8, 22.7, 3.82, 1.23),
            "UNO": (62.0, 48.5, 60.2, 39.1, 5.23, 3.01),
            "OmniGen2": (64.7, 54.8, 60.0, 45.4, 5.25, 3.10),
            "QwenImage": (57.4, 47.5, 59.3, 38.1, 5.50, 3.28),
            "DreamShot": (65.6, 60.2, 61.8, 43.9, 5.40, 3.37),
        },
        stories=80,
    ),
}


def published_table(benchmark: str, mode: str) -> PublishedTable | None:
    return PUBLISHED.get((benchmark, mode))
