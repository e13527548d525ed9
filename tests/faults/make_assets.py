"""Regenerate the image assets of the bad-input corpus (deterministic; run from the repository root):

    python tests/faults/make_assets.py

Good files: ref.png / ref_mask.png, shot1.png / shot1_mask.png, shot2.png. Faulty ones are named after their fault.
Also writes one manifest per manifest fault (`data/<fault>.jsonl`): the valid record below with one change;
the benchmark folders of `dreamshot eval` (`bench/`: ViStoryBench copies, DreamShot test files, folders of
shots to score), the video folders of `dreamshot prepare` (`videos/`), text files in encodings no reader
accepts and folders where files belong (`write_encodings`), an earlier `generate` output (`generated/`) and
latent caches of `data/valid.jsonl` (`caches/`: built for `CACHE_RUN`, the run of the cache cases), each with
one fault.
"""

import copy
import json
import shutil
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from dreamshot.config.load import load_config
from dreamshot.data.cache import INDEX_NAME, cache_fingerprint, size_name
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.data.manifest import load_manifest
from dreamshot.prepare.toyvideo import render_toy_video

FAULTS = Path(__file__).parent
DATA = FAULTS / "data"
BENCH = FAULTS / "bench"
VIDEOS = FAULTS / "videos"
CACHES = FAULTS / "caches"
H, W = 48, 80
# The overrides of `smoke` in the cache cases (cases.yaml, `cached`): the caches' index is built for them.
CACHE_RUN = ["data=manifest", "data.val_groups=0", "data.resolution=[64,112]", "data.aspect_buckets=false"]


def rgb(value: int) -> Image.Image:
    array = np.full((H, W, 3), value, dtype=np.uint8)
    array[12:36, 20:60] = (200, 30, 30)
    return Image.fromarray(array)


def mask(fill: int = 255, size=(H, W)) -> Image.Image:
    array = np.zeros(size, dtype=np.uint8)
    array[size[0] // 4 : 3 * size[0] // 4, size[1] // 4 : 3 * size[1] // 4] = fill
    return Image.fromarray(array, mode="L")


VALID = {
    "id": "group-1",
    "source": "real",
    "style": "flat",
    "references": [{"role": "role1", "image": "ref.png", "prompt": "<Role 1>: a red box", "mask": "ref_mask.png"}],
    "shots": [
        {"image": "shot1.png", "annotation": "Close-up: <Role 1>.", "masks": {"role1": "shot1_mask.png"}},
        {"image": "shot2.png", "annotation": "Wide shot, empty room.", "masks": {}},
    ],
}


def _set(path: str, value):
    def change(record):
        *parents, last = path.split(".")
        node = record
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
        return record

    return change


DELETE = object()
MANIFEST_FAULTS = {
    "missing_id": _set("id", DELETE),
    "id_wrong_type": _set("id", 17),
    "unknown_source": _set("source", "web"),
    "missing_shots": _set("shots", DELETE),
    "no_shots": _set("shots", []),
    "shots_wrong_type": _set("shots", "shot1.png"),
    "unknown_field": _set("shots.0.annotaton", "typo"),
    "unknown_role_in_shot": _set("shots.0.masks", {"role9": "shot1_mask.png"}),
    "duplicate_role": lambda r: {**r, "references": r["references"] * 2},
    "absolute_path": _set("shots.0.image", "/etc/passwd"),
    "escaping_path": _set("references.0.image", "../../README.md"),
    "missing_image": _set("shots.1.image", "shot9.png"),
    "truncated_image": _set("shots.1.image", "truncated.png"),
    "zero_byte_image": _set("references.0.image", "zero_bytes.png"),
    "not_an_image": _set("shots.0.image", "not_an_image.png"),
    "sixteen_bit_image": _set("shots.1.image", "sixteen_bit.png"),
    "mask_wrong_size": _set("shots.0.masks.role1", "mask_wrong_size.png"),
    "mask_not_binary": _set("references.0.mask", "mask_not_binary.png"),
    "mask_empty": _set("shots.0.masks.role1", "mask_empty.png"),
    "mask_rgb": _set("shots.0.masks.role1", "mask_rgb.png"),
}


def write_manifests() -> None:
    for name, change in MANIFEST_FAULTS.items():
        record = change(copy.deepcopy(VALID))
        (DATA / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
    first = json.dumps(VALID)
    (DATA / "duplicate_id.jsonl").write_text(first + "\n" + first + "\n")
    (DATA / "invalid_json.jsonl").write_text(first[:-5] + "\n")
    (DATA / "valid.jsonl").write_text(first + "\n")


def vistory_story(appearing: str = "lily") -> dict:
    """A one-shot ViStoryBench story.json (published schema) with the character `lily`."""

    def text(en: str) -> dict:
        return {"en": en, "ch": "-"}

    lily = {"tag": "non_human", "name_en": "Lily", "name_ch": "-", "prompt_en": "a red box", "prompt_ch": "-"}
    shot = {
        "index": 1,
        "Plot Correspondence": text("Lily waits."),
        "Setting Description": text("A station."),
        "Shot Perspective Design": text("Wide shot"),
        "Characters Appearing": {"en": [appearing], "ch": ["-"]},
        "Static Shot Description": text("Lily waits on the platform."),
    }
    characters = {"lily": {**lily, "num_of_appearances": 1}}
    return {"Story_type": text("Picture book"), "Characters": characters, "Shots": [shot]}


def write_vistory(name: str, stories: dict[str, dict | str | bytes | None], images: bool = True) -> None:
    """`bench/vistory/<name>/ViStory/<NN>/`: story.json (a body, raw text or bytes, or None for no file) and
    lily's image."""
    for number, body in stories.items():
        folder = BENCH / "vistory" / name / "ViStory" / number
        folder.mkdir(parents=True)
        if body is not None:
            text = body if isinstance(body, str | bytes) else json.dumps(body)
            (folder / "story.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        if images:
            (folder / "image" / "lily").mkdir(parents=True)
            rgb(240).resize((16, 16)).save(folder / "image" / "lily" / "00.png")


def write_benchmarks() -> None:
    """ViStoryBench copies and DreamShot test files of one story "01" (one shot showing lily), each with one
    fault, and folders of shots to score (`bench/shots*`)."""
    shutil.rmtree(BENCH, ignore_errors=True)
    valid = vistory_story()
    write_vistory("valid", {"01": valid})
    write_vistory("missing_story_json", {"01": valid, "02": None})
    write_vistory("bad_json", {"01": json.dumps(valid)[:-7]})
    write_vistory("missing_field", {"01": {k: v for k, v in valid.items() if k != "Shots"}})
    write_vistory("unknown_character", {"01": vistory_story(appearing="wolf")})
    write_vistory("missing_reference_images", {"01": valid}, images=False)
    write_vistory("wrong_type", {"01": _set("Shots.0.index", "1")(copy.deepcopy(valid))})

    rgb(240).resize((16, 16)).save(BENCH / "ref.png")
    story = {
        "id": "01",
        "characters": [{"key": "lily", "tag": "non_human", "prompt": "Lily: a red box", "images": ["ref.png"]}],
        "shots": [{"prompt": "Wide shot: Lily waits.", "characters": ["lily"]}],
    }
    test_faults = {
        "missing_field": _set("shots.0.prompt", DELETE),
        "unknown_character": _set("shots.0.characters", ["wolf"]),
        "reference_image_missing": _set("characters.0.images", ["nowhere.png"]),
        "previous_out_of_range": _set("previous", 1),
    }
    for name, change in test_faults.items():
        (BENCH / f"test_{name}.jsonl").write_text(json.dumps(change(copy.deepcopy(story))) + "\n")
    (BENCH / "test_invalid_json.jsonl").write_text(json.dumps(story)[:-3] + "\n")

    shot = rgb(120).resize((32, 24))
    for folder in ("shots/01", "shots_missing_shot/01", "shots_not_an_image/01", "shots_other_story/02"):
        (BENCH / folder).mkdir(parents=True)
    shot.save(BENCH / "shots" / "01" / "shot_01.png")
    shot.save(BENCH / "shots_missing_shot" / "01" / "storyboard.png")  # no shot number: not a shot
    (BENCH / "shots_not_an_image" / "01" / "shot_01.png").write_text("not a PNG\n")
    shot.save(BENCH / "shots_other_story" / "02" / "shot_01.png")


def write_sharding_cases() -> None:
    """Results folders of `dreamshot eval` that belong to another run (`bench/results_*`: their run.json), a test
    file of two shots and one of two stories, and a folder of shots of two sizes in one story."""
    from dreamshot.config.schema import ToyWorldConfig
    from dreamshot.eval.resume import RUN_RECORD

    story = {
        "id": "01",
        "characters": [{"key": "lily", "tag": "non_human", "prompt": "Lily: a red box", "images": ["ref.png"]}],
        "shots": [{"prompt": "Wide shot: Lily waits.", "characters": ["lily"]}, {"prompt": "Lily.", "characters": []}],
    }
    (BENCH / "test_two_shots.jsonl").write_text(json.dumps(story) + "\n")
    stories = [{**story, "shots": story["shots"][:1]}, {**story, "id": "02", "shots": story["shots"][:1]}]
    (BENCH / "test_two_stories.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stories))
    (BENCH / "shots_mixed_sizes" / "01").mkdir(parents=True)
    rgb(120).resize((32, 24)).save(BENCH / "shots_mixed_sizes" / "01" / "shot_01.png")
    rgb(120).resize((24, 24)).save(BENCH / "shots_mixed_sizes" / "01" / "shot_02.png")
    drawn = {"mode": "r2s", "scored": "drawn"}
    other_benchmark = {"command": "eval", "benchmark": "dreamshot_test", "data": "/data/test.jsonl", **drawn}
    # The identity of `eval toy eval.toy.groups=1`, drawn with another model.
    toy = {"command": "eval", "benchmark": "toy", "data": vars(ToyWorldConfig(groups=1, seed=1000)), **drawn}
    for name, identity, fingerprint in (
        ("results_other_benchmark", other_benchmark, None),
        ("results_other_config", toy, {"model": {"name": "wan14b"}}),
    ):
        (BENCH / name).mkdir()
        record = {"identity": identity, "fingerprint": fingerprint}
        (BENCH / name / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def write_videos() -> None:
    """`videos/<fault>/`: folders of `dreamshot prepare` in which no video is usable."""
    shutil.rmtree(VIDEOS, ignore_errors=True)
    for folder in ("no_videos", "not_a_video", "zero_bytes", "truncated", "audio_only", "duplicate_ids"):
        (VIDEOS / folder).mkdir(parents=True)
    write_valid_video()
    (VIDEOS / "no_videos" / "notes.txt").write_text("no video here\n")
    (VIDEOS / "not_a_video" / "clip.mp4").write_text("this is text, not an MP4\n")
    (VIDEOS / "zero_bytes" / "clip.mp4").write_bytes(b"")
    # The index (moov) of an mp4 is written last: the first half of the file is a video nothing can open.
    whole = render_toy_video(VIDEOS / "truncated" / "whole.mp4", scenes=1, size=(32, 48)).path
    (VIDEOS / "truncated" / "clip.mp4").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    write_audio_only(VIDEOS / "audio_only" / "clip.mp4")
    (VIDEOS / "duplicate_ids" / "clip.mp4").write_text("one\n")
    (VIDEOS / "duplicate_ids" / "clip.mkv").write_text("two\n")


def write_valid_video() -> None:
    """`videos/valid/`: one readable toy video (for faults of the output folder rather than of the videos)."""
    render_toy_video(VIDEOS / "valid" / "clip.mp4", scenes=1, size=(32, 48))


def write_audio_only(path: Path) -> None:
    """An mp4 holding a short silent AAC track and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000, layout="mono")
        for index in range(2):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, index * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_encodings() -> None:
    """Text files no reader accepts (Latin-1, UTF-16 without a byte-order mark) and folders named like files."""
    configs, stories = FAULTS / "configs", FAULTS / "stories"
    (configs / "latin1.yaml").write_bytes("extends: smoke\ntags: [café]\n".encode("latin-1"))
    (configs / "utf16_no_bom.yaml").write_bytes("extends: smoke\n".encode("utf-16-le"))
    (configs / "prepare_latin1.yaml").write_bytes("# Réglages\nshots: {min_scene_len: 1}\n".encode("latin-1"))
    (stories / "latin1.yaml").write_bytes("shots:\n  - {annotation: 'Zoë waits.'}\n".encode("latin-1"))
    for folder in (configs / "folder.yaml", stories / "folder.yaml"):
        folder.mkdir(exist_ok=True)
        (folder / ".keep").write_text("a folder named like a file\n")
    record = _set("references.0.prompt", "<Role 1>: une boîte rouge")(copy.deepcopy(VALID))
    (DATA / "latin1.jsonl").write_bytes((json.dumps(record, ensure_ascii=False) + "\n").encode("latin-1"))
    story = _set("Characters.lily.name_en", "Lilé")(vistory_story())
    write_vistory("latin1", {"01": json.dumps(story, ensure_ascii=False).encode("latin-1")})
    earlier = FAULTS / "generated" / "latin1_record"
    earlier.mkdir(parents=True, exist_ok=True)
    record_text = json.dumps({"seed": 1, "story": "café"}, ensure_ascii=False)
    (earlier / "generation.json").write_bytes(record_text.encode("latin-1"))


def write_caches() -> None:
    """`caches/<fault>/`: latent caches of data/valid.jsonl for `CACHE_RUN`, each damaged in one way."""
    shutil.rmtree(CACHES, ignore_errors=True)
    cfg = load_config("smoke", [*CACHE_RUN, f"data.manifest={DATA / 'valid.jsonl'}"])
    manifest = Path(cfg.data.manifest)
    datamodule = StoryboardDataModule(cfg.data, FAULTS, cfg.seed, cfg.curriculum, model=cfg.model)
    (record, size), *_ = datamodule.cache_entries(load_manifest(manifest))
    shard = f"{size_name(size)}/shard-00000.safetensors"
    index = {
        "built_with": cache_fingerprint(cfg.model, cfg.seed, cfg.data.max_shots, manifest),
        "manifest": "data/valid.jsonl",
        "resolutions": {size_name(size): [{"file": shard, "records": [record.id]}]},
    }
    for name in ("empty_index", "not_an_index", "shard_missing", "shard_truncated"):
        (CACHES / name).mkdir(parents=True)
    (CACHES / "empty_index" / INDEX_NAME).write_text("")
    (CACHES / "not_an_index" / INDEX_NAME).write_text("[]\n")
    for name in ("shard_missing", "shard_truncated"):
        (CACHES / name / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    whole = CACHES / "shard_truncated" / shard
    whole.parent.mkdir(parents=True)
    save_file({f"{record.id}/refs": torch.zeros(16, 1, 8, 14)}, whole)
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    rgb(240).save(DATA / "ref.png")
    mask().save(DATA / "ref_mask.png")
    rgb(120).save(DATA / "shot1.png")
    mask().save(DATA / "shot1_mask.png")
    rgb(60).save(DATA / "shot2.png")
    full = (DATA / "shot2.png").read_bytes()
    (DATA / "truncated.png").write_bytes(full[: len(full) // 2])
    (DATA / "zero_bytes.png").write_bytes(b"")
    (DATA / "not_an_image.png").write_text("this is text, not a PNG\n")
    Image.fromarray(np.full((H, W), 3000, dtype=np.uint16)).save(DATA / "sixteen_bit.png")
    mask(size=(H // 2, W // 2)).save(DATA / "mask_wrong_size.png")
    mask(fill=128).save(DATA / "mask_not_binary.png")
    mask(fill=0).save(DATA / "mask_empty.png")
    rgb(255).save(DATA / "mask_rgb.png")
    (DATA / "not_safetensors.safetensors").write_text("not a safetensors file\n")
    (DATA / "not_a_checkpoint.ckpt").write_text("not a checkpoint\n")
    write_manifests()
    write_benchmarks()
    write_sharding_cases()
    write_videos()
    write_encodings()
    write_caches()
    write_loras()


def write_loras() -> None:
    """Second LoRAs (`inference.second_lora`) the tiny Wan (attention width 48) cannot take: one in ComfyUI's format
    for a model of width 64, one in diffusers' format whose modules have two ranks."""
    generator = torch.Generator().manual_seed(0)

    def weights(*shape):
        return torch.randn(shape, generator=generator)

    q = "diffusion_model.blocks.0.self_attn.q"
    other_size = {f"{q}.lora_down.weight": weights(4, 64), f"{q}.lora_up.weight": weights(64, 4)}
    save_file(other_size | {f"{q}.alpha": torch.tensor(4.0)}, DATA / "lora_other_size.safetensors")
    mixed = {}
    for module, rank in (("attn1.to_q", 4), ("attn1.to_k", 2)):
        name = f"transformer.blocks.0.{module}"
        mixed |= {f"{name}.lora_A.weight": weights(rank, 48), f"{name}.lora_B.weight": weights(48, rank)}
    save_file(mixed, DATA / "lora_mixed_ranks.safetensors")


if __name__ == "__main__":
    main()
