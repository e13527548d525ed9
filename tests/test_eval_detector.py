"""The character detector: a tiny random GroundingDINO saved as a transformers folder loads through the real
path; boxes are inside the image and sorted; thresholds apply; detector crops fall back to whole references."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SwinConfig,
)

from dreamshot.config.schema import DetectorConfig
from dreamshot.eval.benchmarks.types import BenchCharacter, BenchShot
from dreamshot.eval.crops import DetectorCrops
from dreamshot.eval.detector import CharacterDetector, clip_box, load_detector
from dreamshot.utils.errors import WeightsError

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "character", "person"]


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grounding_dino")
    backbone = SwinConfig(
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=12,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=16,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB))
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 128}),
        tokenizer=BertTokenizerFast(str(folder / "vocab.txt")),
    )
    processor.save_pretrained(folder)
    return folder


def test_detector_loads_from_a_local_folder_and_returns_sorted_boxes_inside_the_image(detector_dir):
    detector = load_detector(DetectorConfig(weights=str(detector_dir), box_threshold=0.0, text_threshold=0.0))
    assert detector.caption == "character."
    image = Image.new("RGB", (90, 60), (120, 80, 40))
    [(boxes, scores)] = detector([image])
    assert boxes.shape == (12, 4) and scores.shape == (12,)
    assert torch.all(scores[:-1] >= scores[1:])
    crops = detector.crops(image, 3)
    assert 1 <= len(crops) <= 3 and all(c.width <= 90 and c.height <= 60 for c in crops)


def test_detector_threshold_and_whole_image_fallback(detector_dir, tmp_path):
    detector = load_detector(DetectorConfig(weights=str(detector_dir), box_threshold=1.0))
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    assert detector.crops(image, 2) == []
    path = tmp_path / "ref.png"
    image.save(path)
    crops = DetectorCrops(detector)
    [whole] = crops.reference_crops(BenchCharacter("a", "A", "non_human", "A", (path,)))
    assert whole.size == (40, 30)
    assert crops.shot_crops(image, BenchShot(1, "", "", "", "", ())) == []


def test_clip_box_keeps_boxes_inside_and_drops_empty_ones():
    assert clip_box(torch.tensor([-5.0, 2.7, 50.0, 20.2]), (40, 30)) == (0, 2, 40, 20)
    assert clip_box(torch.tensor([10.0, 10.0, 10.4, 20.0]), (40, 30)) is None


def test_a_box_that_rounds_to_no_pixel_gives_no_crop():
    # Centre 2, width 1: corners 1.5 and 2.5 both round to 2, a crop of width 0 that every encoder would fail on.
    assert clip_box(torch.tensor([1.5, 0.0, 2.5, 10.0]), (40, 30)) is None
    detector = TableDetector({(0, 0, 0): [[1.5, 0.0, 2.5, 10.0], [0.0, 0.0, 4.0, 4.0]]})
    crops = DetectorCrops(detector).shot_crops(Image.new("RGB", (30, 30)), BenchShot(1, "", "", "", "", ("a",)))
    assert [c.size for _, c in crops] == [(4, 4)]


class TableDetector(CharacterDetector):
    """Boxes (xyxy pixels, best first) looked up by the image's top-left colour; none for other colours."""

    def __init__(self, table: dict[tuple[int, int, int], list[list[float]]]) -> None:
        super().__init__(torch.nn.Identity(), None, DetectorConfig())
        self.table = table

    def detect(self, image):
        boxes = torch.tensor(self.table.get(image.getpixel((0, 0)), []), dtype=torch.float32).reshape(-1, 4)
        return boxes, torch.linspace(1.0, 0.5, len(boxes))


def test_boxes_are_cut_as_the_published_code_cuts_them():
    # Centre 5.5 -> 5 and size 5 (truncated), corners 2.5 and 7.5, rounded half to even: 2 and 8.
    assert clip_box(torch.tensor([3.0, 3.0, 8.0, 8.0]), (40, 30)) == (2, 2, 8, 8)
    # Centre y 6.5 -> 6, height 5: 3.5 and 8.5 round to 4 and 8 (the box loses its last row).
    assert clip_box(torch.tensor([3.0, 4.0, 9.0, 9.0]), (40, 30)) == (3, 4, 9, 8)


def test_a_shot_gives_every_box_and_a_missed_reference_is_skipped(tmp_path):
    red, green, blue = (200, 0, 0), (0, 200, 0), (0, 0, 200)
    detector = TableDetector({red: [[0, 0, 10, 10]], blue: [[2, 2, 12, 12], [0, 0, 4, 4], [4, 4, 20, 20]]})
    paths = []
    for i, colour in enumerate((red, green, red)):
        paths.append(tmp_path / f"ref{i}.jpg")
        Image.new("RGB", (30, 30), colour).save(paths[-1], quality=100)
    crops = DetectorCrops(detector)
    # The green reference has no detection: skipped, not used whole.
    assert [c.size for c in crops.reference_crops(BenchCharacter("a", "A", "non_human", "A", tuple(paths)))] == [
        (10, 10),
        (10, 10),
    ]
    # Only when every reference is missed are the whole images used.
    [whole] = crops.reference_crops(BenchCharacter("a", "A", "non_human", "A", (paths[1],)))
    assert whole.size == (30, 30)
    # CIDS reads the benchmark's CIDS references when it names them.
    only_green = BenchCharacter("a", "A", "non_human", "A", tuple(paths), cids_images=(paths[1],))
    assert [c.size for c in crops.reference_crops(only_green)] == [(30, 30)]
    # One listed character, three boxes: all three are candidates.
    shot = crops.shot_crops(Image.new("RGB", (30, 30), blue), BenchShot(1, "", "", "", "", ("a",)))
    assert [c.size for _, c in shot] == [(10, 10), (4, 4), (16, 16)]


def test_missing_detector_folder_names_key_and_source(tmp_path):
    with pytest.raises(WeightsError, match=r"folder not found.*eval\.detector\.weights.*grounding-dino-tiny"):
        load_detector(DetectorConfig(weights=str(tmp_path / "gdino")))
