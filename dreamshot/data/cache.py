"""The latent cache (DESIGN §4): Wan VAE latents and umT5 embeddings precomputed into safetensors shards, so
training never runs the VAE or umT5.

A cache folder:

    index.json                       what the cache was built with; which shard holds which storyboard
    64x112/shard-00000.safetensors   `data.cache_shard_size` storyboards whose (H, W) is 64x112
    64x112/shard-00001.safetensors
    80x128/shard-00000.safetensors   ...

A storyboard is cached at its own (H, W): the training resolution, or its aspect bucket. A shard holds, for
every storyboard `id` in it:
- `id/refs` (C, K, h, w): the references, each encoded alone;
- `id/texts` (Σ lengths, D) and `id/text_lengths` (K + T,): the umT5 embeddings of the K role prompts, then
  of the T shot annotations, each cut after its last non-zero row. `encode_texts` zeroes every row after a
  text's end, so padding the rows back with zeros restores the exact (K + T, L, D) tensor;
- `id/shots.s` (C, M, h, w) for every window start s, M = min(T, data.max_shots): the VAE is causal over the
  shot stream, so a shot's latent depends on the shots encoded before it. A group of T > M shots is cut to a
  window whose start varies per pass, and the cache holds the stream of each of its T − M + 1 starts.

Storage per storyboard: ((T − M + 1)·M + K) latent frames of C·h·w values in the VAE's dtype (float32: at
480×832, 16·60·104·4 B = 390 KiB a frame) plus the texts' real tokens × D in the text encoder's dtype
(umT5-XXL in bfloat16: 8 KiB a token, where a padded 512-token text would cost 4 MiB). A group of 8 shots and
3 references at 480p is about 4.2 MiB of latents; one of 30 shots with max_shots 12 holds 19 streams of 12
frames, about 88 MiB.

Writing: a shard goes to a temporary file, is fsynced and renamed (`atomic_path`), then the index is rewritten
atomically; a reader only opens shards that the index lists. A killed writer therefore leaves complete shards,
an index naming only them, and at most one temporary file, which the next writer removes; that rerun encodes
only the storyboards no listed shard holds. A listed shard that is missing or truncated (copied in part, a
damaged disk) makes training refuse the cache naming it; the next `dreamshot cache` unlists it and encodes its
storyboards again.

One writer at a time: a writer holds `.writer.lock` (an flock, which ends with its process however it ends), and
another one (a second `dreamshot cache`, or one per task under `srun`) waits for it, then reads the index it left
and encodes only what is still missing; without the lock the second one removed the first one's temporary file
under its writing and both encoded every storyboard.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dreamshot.config.schema import ModelConfig
from dreamshot.data.dataset import Resolution, load_images, window_starts
from dreamshot.data.manifest import StoryboardRecord, manifest_digest
from dreamshot.models.wan.latents import encode_references, encode_shots
from dreamshot.utils.errors import ConfigError
from dreamshot.utils.io import atomic_path, atomic_write_text, remove_stale_temporaries
from dreamshot.utils.text import read_text

if TYPE_CHECKING:
    from dreamshot.models.wan.adapter import WanAdapter

INDEX_NAME = "index.json"
WRITER_LOCK = ".writer.lock"
# Raised whenever what a shard holds, or how its tensors are computed, changes: old caches are then refused.
CACHE_VERSION = 2  # 2: images with transparency are laid on white (dreamshot.utils.images.to_rgb)
BUILD_HINT = "run `dreamshot cache <experiment>` with this run's config"


@dataclass
class CachedRecord:
    """Everything cached of one storyboard of T shots and K references at one (H, W)."""

    refs: torch.Tensor  # (C, K, h, w)
    texts: torch.Tensor  # (K + T, L, D): role prompts, then every shot annotation
    windows: dict[int, torch.Tensor]  # window start s -> (C, M, h, w): the stream of shots s..s+M-1


def cache_fingerprint(model: ModelConfig, seed: int, max_shots: int, manifest: Path) -> dict[str, Any]:
    """What cached tensors depend on, as flat config keys; a run refuses a cache built with other values.

    A pretrained backbone is named by its folder. A random one (no `pretrained_path`) also depends on the seed
    and on every dimension, the DiT's included: it is drawn first, from the generator the VAE and umT5 use next.
    """
    pretrained = model.pretrained_path
    built: dict[str, Any] = {
        "cache_version": CACHE_VERSION,
        "model.name": model.name,
        "model.pretrained_path": None if pretrained is None else str(Path(pretrained).resolve()),
        "model.dtype": model.dtype,
        "model.text_len": model.text_len,
        "data.max_shots": max_shots,
        "data.manifest (sha256 of its content)": manifest_digest(manifest),
    }
    if pretrained is None:
        built["seed"] = seed
        for part in ("transformer", "vae", "text_encoder"):
            built.update({f"model.{part}.{k}": v for k, v in asdict(getattr(model, part)).items()})
    return built


def cache_bytes(entries: Sequence[tuple[StoryboardRecord, Resolution]], model: ModelConfig, max_shots: int) -> int:
    """An upper estimate of what caching `entries` writes: the latent frames of every window and reference (the
    storage formula of the module docstring) and every text's `text_len` rows, unpacked."""
    element = 4 if model.dtype == "float32" else 2
    total = 0
    for record, (height, width) in entries:
        shots, refs = len(record.shots), len(record.references)
        window = min(shots, max_shots)
        frames = (shots - window + 1) * window + refs
        total += frames * model.vae.z_dim * (height // 8) * (width // 8) * element
        total += (shots + refs) * model.text_len * model.transformer.text_dim * element
    return total


def size_name(size: Resolution) -> str:
    """(H, W) -> "HxW", the name of the folder of that resolution's shards."""
    return f"{size[0]}x{size[1]}"


class LatentCache:
    """A cache folder opened for reading, its index checked against the run's `cache_fingerprint`.

    Raises ConfigError when there is no cache at `root` or it was built with other settings.
    """

    def __init__(self, root: str | Path, fingerprint: dict[str, Any]) -> None:
        self.root = Path(root)
        index = _read_index(self.root)
        if index is None:
            raise ConfigError(f"data.cache_dir={self.root}: no latent cache there (no {INDEX_NAME}); {BUILD_HINT}")
        _check_fingerprint(self.root, index["built_with"], fingerprint)
        self.text_len = fingerprint["model.text_len"]
        self.shards = _shard_of(index)

    def require(self, entries: Sequence[tuple[str, Resolution]]) -> None:
        """Raise ConfigError unless every (record id, (H, W)) is cached in a shard that is whole."""
        missing = [(rid, size) for rid, size in entries if (rid, size_name(size)) not in self.shards]
        if missing:
            rid, size = missing[0]
            held = sorted({size for _, size in self.shards}) or ["none"]
            raise ConfigError(
                f"data.cache_dir={self.root}: {len(missing)} of {len(entries)} storyboards are not cached "
                f"(first: {rid!r} at {size_name(size)}; cached sizes: {', '.join(held)}); {BUILD_HINT}"
            )
        for file in sorted({self.shards[(rid, size_name(size))] for rid, size in entries}):
            fault = shard_fault(self.root / file)
            if fault:
                raise ConfigError(
                    f"data.cache_dir={self.root}: shard {file} listed in {INDEX_NAME} is {fault}; rerun "
                    "`dreamshot cache <experiment>` with this run's config to encode it again"
                )

    def load(self, record_id: str, size: Resolution, window: range) -> dict[str, torch.Tensor]:
        """The cached tensors of a record's shots `window` (N shots) and its K references, as
        `StoryboardLatents` fields without the batch dimension: refs (C, K, h, w), shots (C, N, h, w),
        ref_text (K, L, D), shot_text (N, L, D)."""
        with safe_open(self.root / self.shards[(record_id, size_name(size))], framework="pt") as shard:
            refs = shard.get_tensor(f"{record_id}/refs")
            shots = shard.get_tensor(f"{record_id}/shots.{window.start}")
            packed, lengths = (shard.get_tensor(f"{record_id}/{name}") for name in ("texts", "text_lengths"))
        k = refs.shape[1]
        texts = unpack_texts(packed, lengths, self.text_len)[[*range(k), *(k + n for n in window)]]
        return {"refs": refs, "shots": shots, "ref_text": texts[:k], "shot_text": texts[k:]}


def cache_entries(
    records: Sequence[StoryboardRecord], sizes: Iterable[Sequence[Resolution]]
) -> list[tuple[StoryboardRecord, Resolution]]:
    """(record, (H, W)) pairs, once each, from one (H, W) per record for every training resolution."""
    entries: dict[tuple[str, Resolution], tuple[StoryboardRecord, Resolution]] = {}
    for per_record in sizes:
        for record, size in zip(records, per_record, strict=True):
            entries.setdefault((record.id, size), (record, size))
    return list(entries.values())


# --- writing -----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_record(adapter: WanAdapter, record: StoryboardRecord, size: Resolution, max_shots: int) -> CachedRecord:
    """A record's latents and embeddings as training computes them (`WanAdapter.encode_storyboard`: posterior
    mean, eval mode), on the device of the adapter's VAE; returned on the CPU."""
    shots, refs = load_images(record, size)
    vae = adapter.vae
    texts = adapter.encode_text([[ref.prompt for ref in record.references] + [s.annotation for s in record.shots]])
    length = min(len(record.shots), max_shots)
    windows = {
        start: encode_shots(vae, shots[None, start : start + length].to(vae.device))[0].cpu()
        for start in window_starts(len(record.shots), max_shots)
    }
    return CachedRecord(encode_references(vae, refs[None].to(vae.device))[0].cpu(), texts[0].cpu(), windows)


def write_cache(
    root: str | Path,
    fingerprint: dict[str, Any],
    manifest: Path,
    entries: Sequence[tuple[StoryboardRecord, Resolution]],
    encoder: Callable[[], Callable[[StoryboardRecord, Resolution], CachedRecord]],
    shard_size: int,
    progress: bool = True,
) -> int:
    """Encode and store the (record, (H, W)) `entries` that no complete shard holds yet; returns how many.

    `encoder()` gives the function that encodes one entry; it is called only if an entry is missing, since it
    loads the model. Raises ConfigError if `root` holds a cache built with another fingerprint.
    """
    if shard_size < 1:
        raise ConfigError(f"data.cache_shard_size must be >= 1, got {shard_size}")
    root = Path(root)
    _open_index(root, fingerprint, manifest)  # another run's cache is refused before anything is written
    with _one_writer(root):
        return _write_missing(root, _open_index(root, fingerprint, manifest), entries, encoder, shard_size, progress)


def _open_index(root: Path, fingerprint: dict[str, Any], manifest: Path) -> dict[str, Any]:
    """The index of the cache at `root` (a new one when there is none), refused if built with another fingerprint."""
    index = _read_index(root)
    if index is None:
        index = {"built_with": fingerprint, "manifest": str(manifest.resolve()), "resolutions": {}}
    _check_fingerprint(root, index["built_with"], fingerprint)
    return index


@contextlib.contextmanager
def _one_writer(root: Path) -> Iterator[None]:
    """Held while this process writes the cache at `root`; another writer waits here (module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / WRITER_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"data.cache_dir={root}: another writer is filling it; waiting for it to end", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write_missing(
    root: Path,
    index: dict[str, Any],
    entries: Sequence[tuple[StoryboardRecord, Resolution]],
    encoder: Callable[[], Callable[[StoryboardRecord, Resolution], CachedRecord]],
    shard_size: int,
    progress: bool,
) -> int:
    # Left by a killed writer; never listed in the index, so never read.
    for folder in [root, *root.glob("*/")]:
        remove_stale_temporaries(folder)
    _drop_damaged_shards(root, index)
    cached = _shard_of(index)
    todo: dict[Resolution, list[StoryboardRecord]] = {}
    for record, size in entries:
        if (record.id, size_name(size)) not in cached:
            todo.setdefault(size, []).append(record)
    if not todo:
        return 0
    total, encode = sum(len(records) for records in todo.values()), encoder()
    with tqdm(total=total, unit="storyboard", desc="caching", disable=not progress) as bar:
        for size, records in todo.items():
            bar.set_postfix(size=size_name(size))
            for start in range(0, len(records), shard_size):
                chunk = records[start : start + shard_size]
                tensors: dict[str, torch.Tensor] = {}
                for record in chunk:
                    tensors.update(_record_tensors(record.id, encode(record, size)))
                    bar.update()
                _write_shard(root, index, size, [r.id for r in chunk], tensors)
    return total


def _write_shard(
    root: Path, index: dict[str, Any], size: Resolution, ids: list[str], tensors: dict[str, torch.Tensor]
) -> None:
    """Write one shard atomically, then list it in the index (also written atomically)."""
    shards = index["resolutions"].setdefault(size_name(size), [])
    number = len(shards)
    # A dropped damaged shard leaves a gap: the name must not be one a listed shard has.
    while (
        any(shard["file"] == _shard_name(size, number) for shard in shards)
        or (root / _shard_name(size, number)).exists()
    ):
        number += 1
    name = _shard_name(size, number)
    with atomic_path(root / name) as tmp:
        save_file({key: t.contiguous() for key, t in tensors.items()}, tmp)
    shards.append({"file": name, "records": ids})
    atomic_write_text(root / INDEX_NAME, json.dumps(index, indent=1) + "\n")


def _shard_name(size: Resolution, number: int) -> str:
    return f"{size_name(size)}/shard-{number:05d}.safetensors"


def shard_fault(path: Path) -> str | None:
    """What is wrong with a shard file ("missing", "unreadable (...)"), None when its header covers the file."""
    if not path.is_file():
        return "missing"
    try:
        with safe_open(path, framework="pt"):
            return None
    except (SafetensorError, OSError) as e:
        return f"unreadable ({' '.join(str(e).split())}; truncated?)"


def _drop_damaged_shards(root: Path, index: dict[str, Any]) -> None:
    """Unlist (and delete) the shards that are missing or unreadable, so their storyboards are encoded again."""
    for size, shards in index["resolutions"].items():
        damaged = [shard for shard in shards if shard_fault(root / shard["file"])]
        for shard in damaged:
            (root / shard["file"]).unlink(missing_ok=True)
        index["resolutions"][size] = [shard for shard in shards if shard not in damaged]


def _record_tensors(record_id: str, cached: CachedRecord) -> dict[str, torch.Tensor]:
    packed, lengths = pack_texts(cached.texts)
    tensors = {f"{record_id}/refs": cached.refs, f"{record_id}/texts": packed, f"{record_id}/text_lengths": lengths}
    tensors.update({f"{record_id}/shots.{start}": z for start, z in cached.windows.items()})
    return tensors


# --- texts -------------------------------------------------------------------------------------------------


def pack_texts(texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, L, D) embeddings -> (Σ lengths, D) rows and (F,) lengths, a text's length being the position after
    its last non-zero row (the rows after it are zeros)."""
    nonzero = texts.ne(0).any(-1)
    positions = torch.arange(1, texts.shape[1] + 1)
    lengths = (nonzero * positions).amax(-1)
    return torch.cat([text[:n] for text, n in zip(texts, lengths.tolist(), strict=True)]), lengths


def unpack_texts(packed: torch.Tensor, lengths: torch.Tensor, text_len: int) -> torch.Tensor:
    """The inverse of `pack_texts`: (F, L, D), zeros after each text's rows."""
    texts = packed.new_zeros(len(lengths), text_len, packed.shape[-1])
    for row, rows in enumerate(packed.split(lengths.tolist())):
        texts[row, : len(rows)] = rows
    return texts


# --- index -------------------------------------------------------------------------------------------------


def _read_index(root: Path) -> dict[str, Any] | None:
    path = root / INDEX_NAME
    if not path.exists():
        return None
    try:
        index = json.loads(read_text(path, "cache index", ConfigError))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: unreadable cache index ({e}); delete the cache folder and rebuild it") from None
    if not _index_shape_ok(index):
        raise ConfigError(
            f"{path}: not a cache index (needs 'built_with' and 'resolutions' with the shards' 'file' and "
            "'records'); delete the cache folder and rebuild it"
        )
    return index


def _index_shape_ok(index: Any) -> bool:
    if not (isinstance(index, dict) and isinstance(index.get("built_with"), dict)):
        return False
    resolutions = index.get("resolutions")
    return isinstance(resolutions, dict) and all(
        isinstance(shards, list)
        and all(
            isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("records"), list)
            for shard in shards
        )
        for shards in resolutions.values()
    )


def _shard_of(index: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(record id, "HxW") -> the file, relative to the cache folder, of the listed shard that holds it."""
    return {
        (record_id, size): shard["file"]
        for size, shards in index["resolutions"].items()
        for shard in shards
        for record_id in shard["records"]
    }


def _check_fingerprint(root: Path, built: dict[str, Any], run: dict[str, Any]) -> None:
    for key in sorted(set(built) | set(run)):
        if built.get(key) != run.get(key):
            raise ConfigError(
                f"data.cache_dir={root} was built with {key}={built.get(key)!r}, this run has {run.get(key)!r}: "
                "delete the folder and rebuild it (`dreamshot cache <experiment>`) or set another data.cache_dir"
            )
