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
from dreamshot.eval.detector import clip_box, load_detector
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


def test_missing_detector_folder_names_key_and_source(tmp_path):
    with pytest.raises(WeightsError, match=r"folder not found.*eval\.detector\.weights.*grounding-dino-tiny"):
        load_detector(DetectorConfig(weights=str(tmp_path / "gdino")))
