"""The toy world (DESIGN §4): procedurally drawn storyboard groups with exact role masks and annotations.

A character's identity is (shape, colour, texture); within a group the colours are distinct. A group has
one scene (its `style`: sky gradient and ground colour) and shots with a framing (close-up / medium / wide,
which sets the character size), placements (left / centre / right) and sometimes occlusion: characters stand
close, the one drawn last in front, and each role's mask holds only its VISIBLE pixels. References show one
character alone, centred, on a plain background, in a square image. Nothing is anti-aliased, so every pixel
inside a role's mask has exactly that character's colour or texture colour.

Group i depends only on (seed, i): sets of different sizes share a prefix, and the output is byte-identical
for the same arguments. A share of the groups (`real_share`) is labelled `real` and stands in for camera
footage: the same drawing with sensor noise on its images, so the exact-colour property above holds for the
`synthetic` groups only; the masks stay exact for both.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dreamshot.config.schema import ToyWorldConfig, check_toy_world
from dreamshot.data.manifest import RoleRef, ShotRecord, StoryboardRecord, write_manifest
from dreamshot.data.sources import toy_camera, toy_source
from dreamshot.utils.io import TEMP_SUFFIX, atomic_write_text

# Bump when the drawing changes, so `ensure_toyworld` regenerates sets written by older code.
GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.jsonl"
# The `real` groups' sensor noise: its standard deviation in grey levels (its generator: `sources.toy_camera`).
CAMERA_NOISE = 6.0
PARAMS_NAME = "toyworld.json"

# A group's roles get distinct colours: the config's TOY_MAX_ROLES (dreamshot/config/values.py) counts these.
COLOURS = {
    "red": (214, 39, 40),
    "blue": (31, 90, 200),
    "green": (44, 160, 44),
    "yellow": (240, 200, 20),
    "purple": (140, 70, 180),
    "orange": (250, 127, 14),
    "pink": (235, 110, 180),
    "teal": (23, 170, 170),
    "brown": (140, 86, 45),
}
INKS = {"white": (255, 255, 255), "black": (25, 25, 25)}
TEXTURES = ("solid", "stripes", "dots", "checker")
REFERENCE_BACKGROUND = (236, 236, 236)
# Scene name -> (sky colour at the top, sky colour at the horizon, ground colour).
SCENES = {
    "pastel meadow": ((190, 225, 250), (235, 245, 255), (170, 215, 150)),
    "sunset beach": ((250, 170, 130), (255, 225, 175), (235, 215, 160)),
    "night city": ((20, 30, 70), (70, 80, 130), (75, 75, 85)),
    "snowy field": ((200, 212, 232), (236, 240, 248), (250, 250, 252)),
    "autumn forest": ((235, 200, 150), (250, 232, 195), (150, 105, 60)),
    "underwater reef": ((30, 100, 160), (90, 170, 210), (215, 195, 140)),
}
# Framing -> (annotation phrase, character size as a fraction of the short image side, ground line / height).
FRAMINGS = {
    "close-up": ("Close-up", 0.8, 1.0),
    "medium": ("Medium shot", 0.5, 0.85),
    "wide": ("Wide shot", 0.3, 0.75),
}
# Roles in a shot -> their possible places (left to right) and each place's horizontal centre / width.
PLACES = {
    1: {"left": 0.3, "centre": 0.5, "right": 0.7},
    2: {"left": 0.28, "right": 0.72},
    3: {"left": 0.2, "centre": 0.5, "right": 0.8},
}
# Centre distance of occluding neighbours, in character sizes: < 1 so they overlap, > 0.6 so each keeps its
# centre visible (every shape holds a disc of 0.1 sizes around its centre and reaches at most 0.5 sizes).
OCCLUSION_SPACING = 0.7
OCCLUSION_PROBABILITY = 0.35


def _shape_circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return u**2 + v**2 <= 1


def _shape_square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(abs(u), abs(v)) <= 0.85


def _shape_triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (abs(u) <= (v + 1) / 2) & (v <= 1)


def _shape_diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return abs(u) + abs(v) <= 1


def _shape_star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Five points, one pointing up: the boundary radius falls linearly from 1 at a tip to 0.45 between tips.
    angle = np.arctan2(u, -v) * 5 / (2 * np.pi)
    between_tips = abs((angle + 0.5) % 1 - 0.5) * 2
    return np.hypot(u, v) <= 1 - 0.55 * between_tips


def _shape_hexagon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (abs(v) <= 0.866) & (abs(u) * 0.866 + abs(v) * 0.5 <= 0.866)


SHAPES = {
    "circle": _shape_circle,
    "square": _shape_square,
    "triangle": _shape_triangle,
    "diamond": _shape_diamond,
    "star": _shape_star,
    "hexagon": _shape_hexagon,
}


@dataclass(frozen=True)
class Character:
    """A role's identity: shape, body colour, texture and the colour the texture is drawn in (`ink`)."""

    shape: str
    colour: str
    texture: str
    ink: str

    def describe(self) -> str:
        pattern = {
            "solid": "",
            "stripes": f" with {self.ink} stripes",
            "dots": f" with {self.ink} dots",
            "checker": f" with a {self.ink} checker pattern",
        }[self.texture]
        return f"a {self.colour} {self.shape}{pattern}"

    def paint(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels covered at local coordinates (u, v) (the character spans [-1, 1]²) and their colours.

        Returns (inside (H, W) bool, colours (H, W, 3) uint8); the texture scales with the character.
        """
        inside = SHAPES[self.shape](u, v)
        ink = _texture(self.texture, u, v)
        colours = np.where(ink[..., None], np.uint8(INKS[self.ink]), np.uint8(COLOURS[self.colour]))
        return inside, colours


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the ink goes, as an (H, W) bool array."""
    if texture == "stripes":
        return np.floor((u + v) * 2.5) % 2 == 1
    if texture == "dots":
        return ((u * 2.5) % 1 - 0.5) ** 2 + ((v * 2.5) % 1 - 0.5) ** 2 < 0.06
    if texture == "checker":
        return (np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 1
    return np.zeros(u.shape, dtype=bool)


@dataclass(frozen=True)
class ShotPlan:
    """One shot: framing, the roles present (indices into the group's characters) left to right with their
    places (keys of `PLACES`), and whether they stand close enough to overlap (last of `draw_order` in front)."""

    framing: str
    roles: tuple[int, ...]
    places: tuple[str, ...]
    occluded: bool
    draw_order: tuple[int, ...]


@dataclass(frozen=True)
class GroupPlan:
    characters: tuple[Character, ...]
    scene: str
    shots: tuple[ShotPlan, ...]


# --- planning ----------------------------------------------------------------------------------------------


def plan_group(seed: int, index: int, min_shots: int, max_shots: int, max_roles: int) -> GroupPlan:
    """The content of group `index`, drawn from a generator seeded with (seed, index) only."""
    rng = np.random.default_rng([seed, index])
    num_shots = int(rng.integers(min_shots, max_shots + 1))
    # At most one role per shot is guaranteed a place, so more roles than shots could leave one unseen.
    num_roles = min(int(rng.integers(1, max_roles + 1)), num_shots)
    characters = _draw_characters(rng, num_roles)
    scene = list(SCENES)[rng.integers(len(SCENES))]
    # Shot j leads with role lead_order[j % K], so every role appears at least once.
    lead_order = [int(k) for k in rng.permutation(num_roles)]
    shots = tuple(_draw_shot(rng, lead_order[j % num_roles], num_roles) for j in range(num_shots))
    return GroupPlan(characters, scene, shots)


def _draw_characters(rng: np.random.Generator, count: int) -> tuple[Character, ...]:
    colours = rng.choice(list(COLOURS), count, replace=False)
    shapes = rng.choice(list(SHAPES), count, replace=count > len(SHAPES))
    textures = rng.choice(TEXTURES, count)
    inks = rng.choice(list(INKS), count)
    return tuple(
        Character(str(s), str(c), str(t), str(i)) for s, c, t, i in zip(shapes, colours, textures, inks, strict=True)
    )


def _draw_shot(rng: np.random.Generator, lead: int, num_roles: int) -> ShotPlan:
    framing = list(FRAMINGS)[rng.integers(len(FRAMINGS))]
    most = {"close-up": 1, "medium": 2, "wide": 3}[framing]
    count = int(rng.integers(1, min(most, num_roles) + 1))
    others = [k for k in range(num_roles) if k != lead]
    present = [lead, *(int(k) for k in rng.choice(others, count - 1, replace=False))]
    roles = tuple(int(k) for k in rng.permutation(present))
    places = tuple(PLACES[count]) if count > 1 else (list(PLACES[1])[rng.integers(3)],)
    occluded = count > 1 and bool(rng.random() < OCCLUSION_PROBABILITY)
    front = roles[int(rng.integers(count))]
    draw_order = tuple(k for k in roles if k != front) + (front,)
    return ShotPlan(framing, roles, places, occluded, draw_order)


# --- drawing -----------------------------------------------------------------------------------------------


def render_shot(plan: GroupPlan, shot: ShotPlan, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw a shot. Returns (image (H, W, 3) uint8, labels (H, W) int: 0 background, k+1 role k visible)."""
    _, size_fraction, ground = FRAMINGS[shot.framing]
    size = size_fraction * min(height, width)
    image = _scene_background(plan.scene, height, width, ground)
    labels = np.zeros((height, width), dtype=np.int64)
    centres = _centres(shot, size, width)
    centre_y = height / 2 if shot.framing == "close-up" else ground * height - 0.45 * size
    for role in shot.draw_order:
        centre_x = centres[shot.roles.index(role)]
        _draw_character(image, labels, plan.characters[role], role + 1, (centre_y, centre_x), size)
    return image, labels


def render_reference(character: Character, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The character alone, centred on a plain square. Returns (image (S, S, 3) uint8, mask (S, S) bool)."""
    image = np.empty((side, side, 3), dtype=np.uint8)
    image[:] = REFERENCE_BACKGROUND
    labels = np.zeros((side, side), dtype=np.int64)
    _draw_character(image, labels, character, 1, (side / 2, side / 2), 0.8 * side)
    return image, labels == 1


def _centres(shot: ShotPlan, size: float, width: int) -> list[float]:
    """Horizontal centre (pixels) of each role in `shot.roles`."""
    count = len(shot.roles)
    if shot.occluded:
        return [width / 2 + (i - (count - 1) / 2) * OCCLUSION_SPACING * size for i in range(count)]
    return [width * PLACES[count][place] for place in shot.places]


def _scene_background(scene: str, height: int, width: int, ground: float) -> np.ndarray:
    top, horizon, floor = (np.array(c, dtype=np.float64) for c in SCENES[scene])
    rows = np.arange(height)[:, None] / max(height - 1, 1)
    sky = top + (horizon - top) * np.minimum(rows / ground, 1.0)
    column = np.where(rows < ground, sky, floor)
    return np.repeat(np.round(column).astype(np.uint8)[:, None, :], width, axis=1)


def _draw_character(
    image: np.ndarray, labels: np.ndarray, character: Character, label: int, centre: tuple[float, float], size: float
) -> None:
    """Paint `character` (size pixels across) over `image` and claim its pixels in `labels`, in place."""
    height, width = labels.shape
    half = size / 2
    # Pixel centres in the character's local frame, where it spans [-1, 1] in both directions.
    v = ((np.arange(height) + 0.5 - centre[0]) / half)[:, None].repeat(width, axis=1)
    u = ((np.arange(width) + 0.5 - centre[1]) / half)[None, :].repeat(height, axis=0)
    inside, colours = character.paint(u, v)
    image[inside] = colours[inside]
    labels[inside] = label


# --- text --------------------------------------------------------------------------------------------------


def role_tag(k: int) -> str:
    """The name of role k (0-based) in prompts and annotations."""
    return f"<Role {k + 1}>"


_PLACE_WORDS = {"left": "on the left", "centre": "in the centre", "right": "on the right"}


def annotate(plan: GroupPlan, shot: ShotPlan) -> str:
    """E.g. "Wide shot in a pastel meadow: <Role 1> on the left, <Role 2> on the right." """
    placed = ", ".join(f"{role_tag(k)} {_PLACE_WORDS[place]}" for k, place in zip(shot.roles, shot.places, strict=True))
    article = "an" if plan.scene[0] in "aeiou" else "a"
    text = f"{FRAMINGS[shot.framing][0]} in {article} {plan.scene}: {placed}."
    if shot.occluded:
        front = shot.draw_order[-1]
        slot = shot.roles.index(front)
        # Only neighbouring slots overlap (non-neighbours are 2 * OCCLUSION_SPACING > 1 sizes apart).
        behind = [role_tag(k) for k in shot.roles[max(slot - 1, 0) : slot + 2] if k != front]
        text += f" {role_tag(front)} stands in front of {' and '.join(behind)}."
    return text


# --- writing -----------------------------------------------------------------------------------------------


def toyworld_bytes(groups: int, image_size: tuple[int, int], max_shots: int, max_roles: int) -> int:
    """At most what `generate_toyworld` writes: every group at `max_shots` shots of `image_size` (H, W) with a
    mask per role, and `max_roles` references (squares of the short side) with their masks, uncompressed (PNG is
    smaller), and 4 KiB of records per group."""
    height, width = image_size
    side = min(height, width)
    return groups * (max_shots * height * width * (3 + max_roles) + max_roles * side * side * 4 + 2**12)


def generate_toyworld(
    out_dir: str | os.PathLike,
    groups: int,
    seed: int,
    image_size: tuple[int, int] = (96, 160),
    min_shots: int = 2,
    max_shots: int = 6,
    max_roles: int = 3,
    real_share: float = 0.0,
) -> Path:
    """Write `groups` toy storyboard groups (images, masks, `manifest.jsonl`) into `out_dir`.

    Returns the manifest path. Shots are `image_size` (H, W); references are squares of the short side.
    The generation parameters are stored beside the manifest (`toyworld.json`) for `ensure_toyworld`.
    """
    params = _params(groups, seed, image_size, min_shots, max_shots, max_roles, real_share)
    out_dir = Path(out_dir)
    # Removed first: a set interrupted while being rewritten must not pass for complete.
    (out_dir / PARAMS_NAME).unlink(missing_ok=True)
    records = [_write_group(out_dir, i, params) for i in range(groups)]
    manifest = out_dir / MANIFEST_NAME
    write_manifest(records, manifest)
    # Written last: a set interrupted before this point is regenerated by `ensure_toyworld`.
    atomic_write_text(out_dir / PARAMS_NAME, json.dumps(params, sort_keys=True) + "\n")
    return manifest


def ensure_toyworld(cfg: ToyWorldConfig, out_dir: str | os.PathLike) -> Path:
    """The manifest of the toy world `cfg` in `out_dir`, generated unless already there with the same parameters."""
    out_dir = Path(out_dir)
    image_size = (cfg.image_size[0], cfg.image_size[1])
    args = (cfg.groups, cfg.seed, image_size, cfg.min_shots, cfg.max_shots, cfg.max_roles, cfg.real_share)
    manifest, params_file = out_dir / MANIFEST_NAME, out_dir / PARAMS_NAME
    if manifest.is_file() and params_file.is_file():
        try:
            if json.loads(params_file.read_text()) == _params(*args):
                return manifest
        except json.JSONDecodeError:
            pass  # A damaged parameter file only means the set is written again.
    return generate_toyworld(out_dir, *args)


def _params(
    groups: int,
    seed: int,
    image_size: tuple[int, int],
    min_shots: int,
    max_shots: int,
    max_roles: int,
    real_share: float,
) -> dict:
    height, width = image_size
    check_toy_world(ToyWorldConfig(groups, seed, [height, width], min_shots, max_shots, max_roles, real_share))
    return {
        "version": GENERATOR_VERSION,
        "groups": groups,
        "seed": seed,
        "image_size": [height, width],
        "min_shots": min_shots,
        "max_shots": max_shots,
        "max_roles": max_roles,
        "real_share": real_share,
    }


def _write_group(out_dir: Path, index: int, params: dict) -> StoryboardRecord:
    plan = plan_group(params["seed"], index, params["min_shots"], params["max_shots"], params["max_roles"])
    # A generator of its own: the label and the noise leave the drawing of group i unchanged.
    camera = toy_camera(params["seed"], index)
    source = toy_source(camera, params["real_share"])
    photographed = (lambda image: sensor_noise(image, camera)) if source == "real" else (lambda image: image)
    height, width = params["image_size"]
    group_id = f"toy-{index:05d}"
    folder = out_dir.absolute() / group_id
    folder.mkdir(parents=True, exist_ok=True)
    references = []
    for k, character in enumerate(plan.characters):
        image, mask = render_reference(character, min(height, width))
        image = photographed(image)
        role = f"role{k + 1}"
        image_path, mask_path = folder / f"ref_{role}.png", folder / f"ref_{role}_mask.png"
        _save(image, image_path)
        _save_mask(mask, mask_path)
        references.append(RoleRef(role, image_path, f"{role_tag(k)}: {character.describe()}", mask_path))
    shots = []
    for j, shot in enumerate(plan.shots):
        image, labels = render_shot(plan, shot, height, width)
        image = photographed(image)
        image_path = folder / f"shot_{j + 1:02d}.png"
        _save(image, image_path)
        masks = {}
        for k in sorted(shot.roles):
            masks[f"role{k + 1}"] = folder / f"shot_{j + 1:02d}_role{k + 1}.png"
            _save_mask(labels == k + 1, masks[f"role{k + 1}"])
        shots.append(ShotRecord(image_path, annotate(plan, shot), masks))
    return StoryboardRecord(group_id, source, plan.scene, references, shots, out_dir.absolute())


def sensor_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 with Gaussian noise of CAMERA_NOISE grey levels, as a camera would add."""
    noisy = image.astype(np.float32) + rng.normal(0.0, CAMERA_NOISE, image.shape).astype(np.float32)
    return np.clip(noisy.round(), 0, 255).astype(np.uint8)


def _save(image: np.ndarray, path: Path) -> None:
    # Through a temporary renamed over `path`: the ranks that torchrun or srun start together each write the toy
    # world (the same bytes), and one must never read a file another is rewriting.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")
    os.replace(tmp, path)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    _save(mask.astype(np.uint8) * 255, path)
