"""The latent cache: cached batches equal the on-the-fly encoding, atomic shards, resume, training without the
VAE, and refusal of a cache built for another run."""

import json
import shutil
import threading
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from dreamshot import cli
from dreamshot.commands import cache as cache_command
from dreamshot.commands.cache import build_cache
from dreamshot.config.load import load_config
from dreamshot.data import cache as cache_module
from dreamshot.data import dataset as dataset_module
from dreamshot.data.bucketing import collate_storyboards
from dreamshot.data.cache import (
    CACHE_VERSION,
    INDEX_NAME,
    CachedRecord,
    LatentCache,
    cache_bytes,
    cache_fingerprint,
    pack_texts,
    unpack_texts,
    write_cache,
)
from dreamshot.data.datamodule import StoryboardDataModule
from dreamshot.data.dataset import StoryboardDataset
from dreamshot.data.manifest import load_manifest
from dreamshot.data.toyworld import generate_toyworld
from dreamshot.models.wan.adapter import WanAdapter
from dreamshot.training.module import DreamShotModule
from dreamshot.training.train import train
from dreamshot.utils.errors import ConfigError, DreamShotError

MAX_SHOTS = 2
SIZE = (32, 48)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = generate_toyworld(
        tmp_path_factory.mktemp("toy"), groups=3, seed=1, image_size=SIZE, min_shots=2, max_shots=3, max_roles=2
    )
    records = load_manifest(path)
    # Windows are exercised only if a group is longer than data.max_shots.
    assert any(len(r.shots) > MAX_SHOTS for r in records) and any(r.references for r in records)
    return path


def _overrides(manifest, tmp_path, *extra):
    """The smoke experiment on the small toy world, cached in `tmp_path/cache`, one group a shard."""
    return [
        "logger=csv",
        f"data.manifest={manifest}",
        f"data.resolution=[{SIZE[0]}, {SIZE[1]}]",
        f"data.max_shots={MAX_SHOTS}",
        "data.val_groups=1",
        "data.cache_shard_size=1",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'run'}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.checkpoint_every_n_steps=2",
        *extra,
    ]


def _cfg(manifest, tmp_path, *extra):
    return load_config("smoke", _overrides(manifest, tmp_path, *extra))


@pytest.fixture(scope="module")
def built(manifest, tmp_path_factory):
    """A complete cache of the toy world: (config, number of groups encoded)."""
    cfg = _cfg(manifest, tmp_path_factory.mktemp("built"))
    return cfg, build_cache(cfg, progress=False)


def _datamodule(cfg):
    datamodule = StoryboardDataModule(cfg.data, cfg.output_dir, cfg.seed, cfg.curriculum, model=cfg.model)
    datamodule.setup("fit")
    return datamodule


def test_cached_batches_equal_the_on_the_fly_encoding(built, monkeypatch):
    cfg, encoded = built
    records = load_manifest(cfg.data.manifest)
    assert encoded == len(records)
    cached = StoryboardDataset(records, SIZE, MAX_SHOTS, cfg.seed, train=True, cache=_datamodule(cfg).cache)
    images = cached.with_cache(None)
    adapter = DreamShotModule(cfg).adapter  # the adapter training builds
    # The first pass that draws each window start of each group.
    passes: dict[tuple[int, int], int] = {}
    for index in range(len(records)):
        for epoch in range(20):
            passes.setdefault((index, cached.window(index, epoch).start), epoch)
    long = [i for i, r in enumerate(records) if len(r.shots) > MAX_SHOTS]
    assert {(i, s) for i in long for s in range(len(records[i].shots) - MAX_SHOTS + 1)} <= set(passes)
    for (index, _), epoch in passes.items():
        with monkeypatch.context() as no_images:
            no_images.setattr(dataset_module, "_load_rgb", lambda *a: pytest.fail("a cached sample decoded an image"))
            batch = collate_storyboards([cached[(index, epoch)]])
        reference = collate_storyboards([images[(index, epoch)]])
        expected = adapter.encode_storyboard(reference.shots, reference.refs, reference.shot_texts, reference.ref_texts)
        assert batch.shots is None and batch.refs is None
        assert (batch.num_shots, batch.num_refs) == (reference.num_shots, reference.num_refs)
        assert torch.equal(batch.ref_masks, reference.ref_masks) and torch.equal(batch.shot_masks, reference.shot_masks)
        for name in ("refs", "shots", "ref_text", "shot_text"):
            torch.testing.assert_close(getattr(batch.latents, name), getattr(expected, name), rtol=0, atol=1e-6)


def test_groups_are_cached_at_their_aspect_bucket(built, tmp_path):
    cfg, _ = built
    # A portrait target puts the landscape toy shots in the 32x48 bucket: the groups the cache already holds.
    portrait = [f"data.cache_dir={cfg.data.cache_dir}", "data.resolution=[48, 32]", "data.aspect_buckets=true"]
    datamodule = _datamodule(_cfg(cfg.data.manifest, tmp_path, *portrait))
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.shots is None and batch.shot_masks.shape[-2:] == SIZE
    assert batch.latents.shots.shape[-2:] == (SIZE[0] // 8, SIZE[1] // 8)


def test_text_packing_is_lossless():
    texts = torch.randn(3, 6, 4)
    texts[0, 2:] = 0  # a text of two tokens
    texts[1, :] = 0  # an empty one
    packed, lengths = pack_texts(texts)
    assert lengths.tolist() == [2, 0, 6] and packed.shape == (8, 4)
    assert torch.equal(unpack_texts(packed, lengths, 6), texts)


def test_killed_writer_leaves_complete_shards_and_a_rerun_resumes(manifest, tmp_path, monkeypatch, capsys):
    cfg = _cfg(manifest, tmp_path)
    root = tmp_path / "cache"
    real_save, saved = cache_module.save_file, []

    def dies_halfway_through_the_second_shard(tensors, path):
        saved.append(path)
        real_save(tensors, path)
        if len(saved) == 2:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise KeyboardInterrupt  # the writer stops in the middle of the file

    monkeypatch.setattr(cache_module, "save_file", dies_halfway_through_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, progress=False)
    index = json.loads((root / INDEX_NAME).read_text())
    listed = [shard["file"] for shard in index["resolutions"]["32x48"]]
    assert listed == ["32x48/shard-00000.safetensors"]
    assert sorted(p.name for p in (root / "32x48").iterdir()) == ["shard-00000.safetensors"]  # no half shard
    first = index["resolutions"]["32x48"][0]["records"]
    assert set(load_file(root / listed[0])) >= {f"{first[0]}/refs", f"{first[0]}/texts", f"{first[0]}/shots.0"}

    # A SIGKILL leaves the temporary file behind; the next writer removes it.
    stale = root / "32x48" / ".shard-00001.safetensors.x1y2.tmp"
    stale.write_bytes(b"half a shard")
    monkeypatch.setattr(cache_module, "save_file", real_save)
    encoded = []
    real_encode = cache_command.encode_record
    monkeypatch.setattr(
        cache_command,
        "encode_record",
        lambda a, record, *rest, **kw: encoded.append(record.id) or real_encode(a, record, *rest, **kw),
    )
    assert cli.main(["cache", "smoke", *_overrides(manifest, tmp_path), "--device", "cpu", "--no-progress"]) == 0
    records = [r.id for r in load_manifest(manifest)]
    assert sorted(encoded) == sorted(set(records) - set(first))  # only the groups no complete shard held
    assert not stale.exists()
    assert str(root) in capsys.readouterr().out
    fingerprint = cache_fingerprint(cfg.model, cfg.seed, MAX_SHOTS, manifest)
    LatentCache(root, fingerprint).require([(rid, SIZE) for rid in records])

    # Complete: a rerun neither encodes nor builds the model.
    monkeypatch.setattr(WanAdapter, "seeded", lambda *a, **k: pytest.fail("built the model for a complete cache"))
    assert build_cache(cfg, progress=False) == 0


def test_training_reads_the_cache_and_never_runs_the_vae(built, tmp_path, monkeypatch):
    cfg, _ = built
    monkeypatch.setattr(AutoencoderKLWan, "encode", lambda *a, **k: pytest.fail("the VAE ran in a cached run"))
    out = train(cfg)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    monkeypatch.undo()
    on_the_fly = train(_cfg(cfg.data.manifest, tmp_path, "data.cache_dir=null"))
    a, b = load_file(out / "lora.safetensors"), load_file(on_the_fly / "lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_a_cache_of_another_run_is_refused(built, tmp_path):
    cfg, _ = built
    cache_dir = f"data.cache_dir={cfg.data.cache_dir}"
    other_size = _cfg(cfg.data.manifest, tmp_path, cache_dir, "data.resolution=[48, 48]")
    with pytest.raises(ConfigError, match=r"not cached \(first: .* at 48x48; cached sizes: 32x48\)") as error:
        _datamodule(other_size)
    assert "\n" not in str(error.value) and "dreamshot cache" in str(error.value)
    for override, key in [
        ("model.vae.base_dim=16", "model.vae.base_dim"),
        ("seed=1", "seed"),
        ("data.max_shots=3", "data.max_shots"),
    ]:
        other = _cfg(cfg.data.manifest, tmp_path, cache_dir, override)
        with pytest.raises(ConfigError, match=f"built with {key}=") as error:
            _datamodule(other)
        assert "\n" not in str(error.value)
        with pytest.raises(ConfigError, match=f"built with {key}="):
            build_cache(other, progress=False)  # nor extended with other tensors
    # In `train`, the model config comes from the module being fitted.
    with pytest.raises(ConfigError, match="built with model.text_len="):
        train(_cfg(cfg.data.manifest, tmp_path, cache_dir, "model.text_len=16"))
    edited = Path(cfg.data.manifest).with_name("edited.jsonl")
    edited.write_text(Path(cfg.data.manifest).read_text() + "\n")  # the same records, other bytes
    with pytest.raises(ConfigError, match=r"built with data.manifest \(sha256 of its content\)="):
        _datamodule(_cfg(edited, tmp_path, cache_dir))
    with pytest.raises(ConfigError, match="no latent cache there"):
        _datamodule(_cfg(cfg.data.manifest, tmp_path, f"data.cache_dir={tmp_path / 'empty'}"))


def test_too_little_space_for_the_cache_is_reported_before_the_model_is_built(manifest, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 1000))
    monkeypatch.setattr(cache_command, "_encoder", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(DreamShotError, match=r"data.cache_dir .*cache: 0.00 GiB free, the latents of every storyboard"):
        build_cache(_cfg(manifest, tmp_path), progress=False)
    assert not (tmp_path / "cache").exists()


def test_the_cache_estimate_covers_what_is_written(built):
    cfg, _ = built
    entries = _datamodule(cfg).cache_entries(load_manifest(cfg.data.manifest))
    written = sum(p.stat().st_size for p in Path(cfg.data.cache_dir).rglob("*.safetensors"))
    assert written <= cache_bytes(entries, cfg.model, cfg.data.max_shots) <= 3 * written


def test_a_second_writer_waits_for_the_first_then_encodes_only_what_is_missing(manifest, tmp_path):
    """Two `dreamshot cache` at once (one per task under srun): unlocked, the second removed the first one's
    temporary file under its writing and both encoded every storyboard."""
    root, records = tmp_path / "cache", load_manifest(manifest)
    entries, fingerprint = [(record, SIZE) for record in records], {"cache_version": CACHE_VERSION}
    encoded, results, second_encodes = {"first": [], "second": []}, {}, threading.Event()

    def encoder(writer):
        def encode(record, size):
            encoded[writer].append(record.id)
            if writer == "second":
                second_encodes.set()
            elif len(encoded["first"]) == 1:
                second.start()
                second_encodes.wait(timeout=2)  # an unlocked second writer is encoding by now
            return CachedRecord(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1), {0: torch.zeros(1, 1, 1, 1)})

        return lambda: encode

    def write(writer):
        results[writer] = write_cache(root, fingerprint, manifest, entries, encoder(writer), 1, progress=False)

    second = threading.Thread(target=write, args=("second",))
    write("first")
    second.join(timeout=60)
    assert results == {"first": len(records), "second": 0} and not encoded["second"]
    shards = json.loads((root / INDEX_NAME).read_text())["resolutions"][f"{SIZE[0]}x{SIZE[1]}"]
    assert sorted(rid for shard in shards for rid in shard["records"]) == sorted(r.id for r in records)
