"""Regenerate the image assets of the bad-input corpus (deterministic; run from the repository root):

    python tests/faults/make_assets.py

Good files: ref.png / ref_mask.png, shot1.png / shot1_mask.png, shot2.png. Faulty ones are named after their fault.
Also writes one manifest per manifest fault (`data/<fault>.jsonl`): the valid record below with one change.
"""

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).parent / "data"
H, W = 48, 80


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


if __name__ == "__main__":
    main()
