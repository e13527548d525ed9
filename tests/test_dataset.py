"""Dataset tensors and geometry, collate, bucket sampler, aspect buckets and the datamodule."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from scipy.ndimage import binary_dilation, binary_erosion

from dreamshot.config.load import load_config
from dreamshot.config.schema import DataConfig, ToyWorldConfig
from dreamshot.data.bucketing import (
    BucketBatchSampler,
    SampleKey,
    StoryboardBatch,
    aspect_bucket,
    collate_storyboards,
)
from dreamshot.data.datamodule import EpochBatches, EpochProgress, StoryboardDataModule
from dreamshot.data.dataset import StoryboardDataset
from dreamshot.data.manifest import RoleRef, ShotRecord, StoryboardRecord, load_manifest, write_manifest
from dreamshot.data.toyworld import COLOURS, generate_toyworld
from dreamshot.utils.errors import ConfigError, DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> list[StoryboardRecord]:
    folder = tmp_path_factory.mktemp("toy")
    return load_manifest(generate_toyworld(folder, groups=8, seed=2, image_size=(48, 80), min_shots=3))


def _image(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _filled(height: int, width: int, colour: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, len(colour))).copy()


def _record(tmp_path: Path, shots: list[ShotRecord], refs: list[RoleRef] = ()) -> StoryboardRecord:
    return StoryboardRecord("hand", "real", "plain", list(refs), shots, tmp_path)


# --- samples -----------------------------------------------------------------------------------------------


def test_samples_have_documented_shapes_dtypes_and_ranges(toy) -> None:
    dataset = StoryboardDataset(toy, (32, 48), max_shots=4)
    for index, record in enumerate(toy):
        sample = dataset[index]
        n, k = min(len(record.shots), 4), len(record.references)
        assert sample["id"] == record.id and sample["source"] == "synthetic"
        assert sample["shots"].shape == (n, 3, 32, 48) and sample["refs"].shape == (k, 3, 32, 48)
        assert sample["ref_masks"].shape == (k, 32, 48) and sample["shot_masks"].shape == (n, k, 32, 48)
        assert len(sample["shot_texts"]) == n and sample["ref_texts"] == [r.prompt for r in record.references]
        for name in ("shots", "refs", "ref_masks", "shot_masks"):
            assert sample[name].dtype == torch.float32
        assert sample["shots"].min() >= -1 and sample["shots"].max() <= 1
        for name in ("ref_masks", "shot_masks"):
            assert set(sample[name].unique().tolist()) <= {0.0, 1.0}
        assert (sample["ref_masks"].flatten(1).sum(1) > 0).all()


def test_shot_masks_follow_reference_order_and_are_zero_for_absent_roles(toy) -> None:
    dataset = StoryboardDataset(toy, (32, 48), max_shots=12, train=False)
    for index, record in enumerate(toy):
        masks = dataset[index]["shot_masks"]
        for n, shot in enumerate(record.shots):
            for k, ref in enumerate(record.references):
                assert bool(masks[n, k].any()) == (ref.role in shot.masks)


def test_long_storyboards_are_cut_to_reproducible_windows(toy) -> None:
    index = next(i for i, r in enumerate(toy) if len(r.shots) >= 5)
    annotations = [shot.annotation for shot in toy[index].shots]
    evaluation = StoryboardDataset(toy, (32, 48), max_shots=2, train=False)
    assert evaluation[(index, 7)]["shot_texts"] == annotations[:2]
    training = StoryboardDataset(toy, (32, 48), max_shots=2, seed=4)
    full = StoryboardDataset(toy, (32, 48), max_shots=12, train=False)[index]
    starts = set()
    for epoch in range(8):
        window = training.window(index, epoch)
        sample = training[(index, epoch)]
        assert len(window) == 2 and sample["shot_texts"] == annotations[window.start : window.stop]
        assert torch.equal(sample["shots"], full["shots"][window.start : window.stop])
        assert torch.equal(sample["shot_masks"], full["shot_masks"][window.start : window.stop])
        assert training.window(index, epoch) == window
        starts.add(window.start)
    assert len(starts) > 1
    assert training[index]["shot_texts"] == training[(index, 0)]["shot_texts"]


def test_reference_is_letterboxed_keeping_its_aspect(tmp_path: Path) -> None:
    tall = _image(tmp_path / "ref.png", _filled(80, 40, RED))
    mask = _image(tmp_path / "ref_mask.png", np.full((80, 40), 255))
    shot = ShotRecord(_image(tmp_path / "shot.png", _filled(32, 64, BLUE)), "a shot", {})
    sample = StoryboardDataset([_record(tmp_path, [shot], [RoleRef("r", tall, "<Role 1>", mask)])], (32, 64), 4)[0]
    # 40x80 fits 32 high as 16x32, centred: white columns 0..23 and 40..63 around red 24..39.
    expected_mask = torch.zeros(32, 64)
    expected_mask[:, 24:40] = 1
    assert torch.equal(sample["ref_masks"][0], expected_mask)
    ref = sample["refs"][0]
    assert torch.allclose(ref[:, :, 24:40], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 32, 16))
    assert (ref[:, :, :24] == 1).all() and (ref[:, :, 40:] == 1).all()


def test_shot_is_resized_to_cover_and_centre_cropped_with_its_mask(tmp_path: Path) -> None:
    # 100x100: a green band above and below the centre 50 rows (red left half, blue right half).
    pixels = _filled(100, 100, GREEN)
    pixels[25:75, :50], pixels[25:75, 50:] = RED, BLUE
    mask = np.zeros((100, 100))
    mask[25:50] = 255
    shot = ShotRecord(_image(tmp_path / "s.png", pixels), "t", {"r": _image(tmp_path / "m.png", mask)})
    ref = RoleRef("r", _image(tmp_path / "ref.png", _filled(8, 8, RED)), "p", _image(tmp_path / "rm.png", mask[:8, :8]))
    sample = StoryboardDataset([_record(tmp_path, [shot], [ref])], (32, 64), 4)[0]
    # Scale 0.64 makes it 64x64; the centre 32 rows are source rows 25..75, the red/blue band, no green.
    image = sample["shots"][0]
    assert (image[1, 1:-1] < -0.9).all()
    assert (image[0, 1:-1, :31] > 0.9).all() and (image[2, 1:-1, 33:] > 0.9).all()
    expected_mask = torch.zeros(32, 64)
    expected_mask[:16] = 1
    assert torch.equal(sample["shot_masks"][0, 0], expected_mask)


def test_toy_masks_stay_on_their_roles_pixels_after_resizing(toy) -> None:
    dataset = StoryboardDataset(toy, (40, 56), max_shots=12, train=False)
    checked = 0
    for index, record in enumerate(toy):
        sample = dataset[index]
        for k, ref in enumerate(record.references):
            if " with " in ref.prompt:
                continue  # textured characters blend two colours when resampled
            body = torch.tensor(next(c for name, c in COLOURS.items() if f" {name} " in ref.prompt)) / 127.5 - 1
            for n in range(len(record.shots)):
                mask = sample["shot_masks"][n, k].numpy().astype(bool)
                close = (sample["shots"][n] - body[:, None, None]).abs().amax(0).numpy() < 0.15
                assert close[binary_erosion(mask, iterations=2)].all()
                assert not (close & ~binary_dilation(mask, iterations=2)).any()
                checked += int(mask.any())
    assert checked >= 3


def test_storyboard_without_references_has_empty_role_axes(tmp_path: Path) -> None:
    shots = [ShotRecord(_image(tmp_path / f"{i}.png", _filled(20, 30, RED)), f"shot {i}", {}) for i in range(3)]
    sample = StoryboardDataset([_record(tmp_path, shots)], (16, 32), 4)[0]
    assert sample["refs"].shape == (0, 3, 16, 32) and sample["ref_masks"].shape == (0, 16, 32)
    assert sample["shot_masks"].shape == (3, 0, 16, 32) and sample["ref_texts"] == []


def test_per_record_resolutions(toy) -> None:
    dataset = StoryboardDataset(toy[:2], [(32, 48), (48, 32)], max_shots=3)
    assert dataset[1]["shots"].shape[-2:] == (48, 32)
    assert [key[2] for key in dataset.bucket_keys()] == [(32, 48), (48, 32)]
    with pytest.raises(ValueError, match="2 resolutions for 3 records"):
        StoryboardDataset(toy[:3], [(32, 48), (48, 32)], max_shots=3)


def test_decode_failures_are_data_errors_naming_the_file(tmp_path: Path) -> None:
    grey = np.full((20, 30), 255)
    grey[0, 0] = 128
    image = _image(tmp_path / "s.png", _filled(20, 30, RED))
    shot = ShotRecord(image, "t", {"r": _image(tmp_path / "m.png", grey)})
    ref = RoleRef("r", image, "p", _image(tmp_path / "rm.png", np.full((20, 30), 255)))
    with pytest.raises(DataError, match=r"record 'hand': shots\[0\]\.masks\.r: mask .*m\.png has values other"):
        StoryboardDataset([_record(tmp_path, [shot], [ref])], (16, 32), 4)[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(image.read_bytes()[:-30])
    shot = ShotRecord(broken, "t", {})
    with pytest.raises(DataError, match=r"record 'hand': shots\[0\]\.image: cannot decode .*broken\.png") as info:
        StoryboardDataset([_record(tmp_path, [shot])], (16, 32), 4)[0]
    assert "\n" not in str(info.value)


# --- collate and sampler -----------------------------------------------------------------------------------


def test_collate_stacks_one_bucket_and_rejects_mixed_shapes(toy) -> None:
    dataset = StoryboardDataset(toy, (32, 48), max_shots=2)
    keys = dataset.bucket_keys()
    same = [i for i, key in enumerate(keys) if key == keys[0]]
    other = next(i for i, key in enumerate(keys) if key[1] != keys[0][1])
    batch = collate_storyboards([dataset[i] for i in same])
    assert isinstance(batch, StoryboardBatch)
    assert (batch.batch_size, batch.num_shots, batch.num_refs) == (len(same), 2, keys[0][1])
    assert batch.shots.shape == (len(same), 2, 3, 32, 48)
    assert batch.shot_masks.shape == (len(same), 2, keys[0][1], 32, 48)
    assert batch.ids == [toy[i].id for i in same] and len(batch.shot_texts[0]) == 2
    with pytest.raises(ValueError, match="cannot batch"):
        collate_storyboards([dataset[same[0]], dataset[other]])


KEYS = [(i % 3, 1, (32, 48)) for i in range(23)]  # buckets of 8, 8 and 7 indices


def test_sampler_batches_come_from_one_bucket_and_cover_every_index_once() -> None:
    sampler = BucketBatchSampler(KEYS, batch_size=3, shuffle=True, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 9
    assert all(len({KEYS[i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(23))


def test_sampler_shuffle_is_reproducible_per_epoch() -> None:
    def order(epoch: int, seed: int = 0, shuffle: bool = True) -> list[list[int]]:
        sampler = BucketBatchSampler(KEYS, 3, shuffle, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1) == order(1)
    assert order(1) != order(2) and order(1, seed=1) != order(1)
    unshuffled = [[0, 3, 6], [9, 12, 15], [18, 21], [1, 4, 7], [10, 13, 16], [19, 22], [2, 5, 8], [11, 14, 17], [20]]
    assert order(1, shuffle=False) == order(2, shuffle=False) == unshuffled


def test_sampler_drop_last_keeps_only_full_batches() -> None:
    batches = list(BucketBatchSampler(KEYS, 3, shuffle=True, seed=0, drop_last=True))
    assert len(batches) == 6 and all(len(batch) == 3 for batch in batches)


@pytest.mark.parametrize("replicas", [3, 4])
def test_replicas_get_equal_length_shards_of_all_batches(replicas: int) -> None:
    shards = []
    for rank in range(replicas):
        sampler = BucketBatchSampler(KEYS, 3, True, 0, num_replicas=replicas, rank=rank)
        sampler.set_epoch(5)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == -(-9 // replicas)
    flat = [tuple(batch) for shard in shards for batch in shard]
    assert sorted(i for batch in set(flat) for i in batch) == list(range(23))
    if 9 % replicas == 0:
        assert len(set(flat)) == len(flat) == 9  # disjoint when no padding is needed


def _rank_batches(replicas: int, shuffle: bool, **kwargs) -> list[list[list[SampleKey]]]:
    """Every rank's keyed batches of one epoch of KEYS in batches of 3 (`EpochBatches` kwargs: length, multiple)."""
    ranks = []
    for rank in range(replicas):
        sampler = BucketBatchSampler(KEYS, 3, shuffle, 0, num_replicas=replicas, rank=rank)
        ranks.append(list(EpochBatches(sampler, lambda: None, EpochProgress(), **kwargs)))
    return ranks


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_the_ranks_batches_that_are_no_repeat_hold_every_storyboard_once(replicas: int) -> None:
    # 9 batches: 2 ranks pad with 1 repeat, 4 with 3; validation weighs the repeats zero (DreamShotModule).
    ranks = _rank_batches(replicas, shuffle=False)
    assert len({len(batches) for batches in ranks}) == 1  # every rank runs as many forwards
    keys = [key for batches in ranks for batch in batches for key in batch]
    assert sorted(key.index for key in keys if not key.repeat) == list(range(23))
    assert sum(batch[0].repeat for batches in ranks for batch in batches) == -9 % replicas
    assert all(len({key.repeat for key in batch}) == 1 for batches in ranks for batch in batches)


@pytest.mark.parametrize(("replicas", "kwargs"), [(1, {"multiple": 2}), (2, {"multiple": 3}), (2, {"length": 12})])
def test_a_batch_knows_the_storyboards_of_its_optimizer_step_over_every_replica(replicas: int, kwargs) -> None:
    multiple = kwargs.get("multiple", 2)
    ranks = _rank_batches(replicas, shuffle=True, **{"multiple": multiple, **kwargs})
    sizes = set()
    for start in range(0, len(ranks[0]), multiple):
        step = [batch for batches in ranks for batch in batches[start : start + multiple]]
        assert {key.step_samples for batch in step for key in batch} == {sum(len(batch) for batch in step)}
        sizes |= {len(batch) for batch in step}
    assert sizes == {2, 3} or sizes == {1, 2, 3}  # buckets of 8 and 7 end in short batches


def test_a_batch_carries_its_keys_repeat_and_step_samples(toy) -> None:
    dataset = StoryboardDataset(toy[:1], (48, 80), max_shots=3)
    batch = collate_storyboards([dataset[SampleKey(0, 4, repeat=True, step_samples=5)]] * 2)
    assert (batch.repeat, batch.step_samples, batch.batch_size) == (True, 5, 2)
    plain = collate_storyboards([dataset[(0, 4)]])
    assert (plain.repeat, plain.step_samples) == (False, None)


@pytest.mark.parametrize(
    ("size", "target", "bucket"),
    [
        ((64, 112), (64, 112), (64, 112)),
        ((112, 64), (64, 112), (112, 64)),
        ((96, 160), (64, 112), (64, 112)),
        ((1080, 1920), (480, 832), (480, 832)),
        ((500, 500), (192, 336), (256, 256)),
        ((400, 300), (192, 336), (288, 224)),
    ],
)
def test_aspect_bucket(size, target, bucket) -> None:
    assert aspect_bucket(*size, target) == bucket


# --- datamodule --------------------------------------------------------------------------------------------


def _data_config(**overrides) -> DataConfig:
    toy = ToyWorldConfig(groups=6, seed=0, image_size=[32, 48], min_shots=2, max_shots=4, max_roles=2)
    fields = {"resolution": [32, 48], "max_shots": 3, "batch_size": 2, "val_groups": 2, **overrides}
    return DataConfig(toy=toy, **fields)


def test_datamodule_yields_bucketed_batches_with_the_epoch_in_the_indices(tmp_path: Path) -> None:
    module = StoryboardDataModule(_data_config(), tmp_path, seed=0)
    module.prepare_data()
    module.setup("fit")
    assert (tmp_path / "toyworld" / "manifest.jsonl").is_file()
    assert (len(module.train_set), len(module.val_set)) == (4, 2)
    assert module.val_set.records[-1].id == "toy-00005"
    loader = module.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(3)  # no trainer attached: the sampler's own epoch counts
    assert all(key.epoch == 3 for batch in loader.batch_sampler for key in batch)
    batches = list(loader)
    assert sum(b.batch_size for b in batches) == 4
    for batch in batches:
        assert isinstance(batch, StoryboardBatch) and batch.shots.dtype == torch.float32
        assert batch.shots.shape[-2:] == (32, 48) and batch.num_shots <= 3
        assert batch.shot_masks.shape[:3] == (batch.batch_size, batch.num_shots, batch.num_refs)
    val_ids = [b.ids for b in module.val_dataloader()]
    assert val_ids == [b.ids for b in module.val_dataloader()]


def test_datamodule_aspect_buckets_and_config_faults(tmp_path: Path) -> None:
    module = StoryboardDataModule(_data_config(aspect_buckets=True, resolution=[48, 48]), tmp_path, seed=0)
    module.setup()
    assert {key[2] for key in module.train_set.bucket_keys()} == {aspect_bucket(32, 48, (48, 48))}
    with pytest.raises(ConfigError, match=r"data.sources=\['real'\] keeps no training group"):
        StoryboardDataModule(_data_config(sources=["real"]), tmp_path, seed=0).setup()
    with pytest.raises(ConfigError, match="data.val_groups=6 leaves no training groups"):
        StoryboardDataModule(_data_config(val_groups=6), tmp_path, seed=0).setup()


def test_datamodule_checks_the_manifest_files_in_prepare_data(tmp_path: Path) -> None:
    StoryboardDataModule(_data_config(), tmp_path, seed=0).prepare_data()
    (tmp_path / "toyworld" / "toy-00003" / "shot_01.png").write_bytes(b"not an image")
    module = StoryboardDataModule(_data_config(), tmp_path, seed=0)
    module.setup()  # records only: the bad file surfaces when decoded or in prepare_data
    with pytest.raises(DataError, match=r"manifest.jsonl:4: record 'toy-00003': shots\[0\]\.image: unreadable"):
        module.prepare_data()


def test_datamodule_filters_training_sources_and_keeps_validation(tmp_path: Path, toy) -> None:
    mixed = [replace(r, source="real") if i % 2 else r for i, r in enumerate(toy)]
    write_manifest(mixed, toy[0].root / "mixed.jsonl")
    cfg = _data_config(manifest=str(toy[0].root / "mixed.jsonl"), sources=["real"])
    module = StoryboardDataModule(cfg, tmp_path, seed=0)
    module.setup()
    assert [r.id for r in module.train_set.records] == ["toy-00001", "toy-00003", "toy-00005"]
    assert [r.source for r in module.val_set.records] == ["synthetic", "real"]
    assert not (tmp_path / "toyworld").exists()


@pytest.mark.parametrize("member", ["both", "real", "synthetic"])
def test_every_toy_data_sources_member_keeps_training_groups(tmp_path: Path, member: str) -> None:
    cfg = load_config("toy_data_sources", ["data.toy.groups=8", "data.toy.image_size=[32,48]"], member=member)
    module = StoryboardDataModule(cfg.data, tmp_path, seed=0)
    module.setup()
    sources = {r.source for r in module.train_set.records}
    assert sources == ({"real", "synthetic"} if member == "both" else {member})


class _RecordBatches(L.LightningModule):
    """Records, at every training step, (trainer epoch, sampler epoch, batch ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, list[str]]] = []

    def training_step(self, batch: StoryboardBatch, batch_idx: int) -> torch.Tensor:
        sampler_epoch = self.trainer.train_dataloader.batch_sampler.sampler.epoch
        self.seen.append((self.current_epoch, sampler_epoch, batch.ids))
        return self.weight * batch.shots.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path: Path, max_steps: int, ckpt_path: Path | None = None, save_every: int | None = None) -> list:
    module = _RecordBatches()
    callbacks = (
        [ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=save_every, save_top_k=-1)] if save_every else []
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=bool(save_every),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    datamodule = StoryboardDataModule(_data_config(batch_size=1), tmp_path / "data", seed=0)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_trainer_epochs_reach_the_sampler_and_a_mid_epoch_resume_continues_the_epoch(tmp_path: Path) -> None:
    straight = _fit(tmp_path, max_steps=10)
    assert {epoch for epoch, _, _ in straight} == {0, 1, 2}  # 4 training groups, one per batch
    assert all(epoch == sampler_epoch for epoch, sampler_epoch, _ in straight)
    assert [ids for _, _, ids in straight[:4]] != [ids for _, _, ids in straight[4:8]]  # reshuffled
    first = _fit(tmp_path, max_steps=6, save_every=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PossibleUserWarning)  # e.g. "your dataloader is not resumable"
        resumed = _fit(tmp_path, max_steps=10, ckpt_path=tmp_path / "ckpt" / "epoch=1-step=6.ckpt")
    assert first + resumed == straight


@pytest.mark.parametrize("seed", [0, 2, 4])  # the training groups of these worlds: synthetic only, both, real only
@pytest.mark.parametrize("source", ["real", "synthetic"])
def test_a_source_no_toy_training_group_has_is_refused_at_load_and_only_then(tmp_path: Path, seed, source) -> None:
    """Decided from the labels' draws, before the toy world is written, exactly as it writes them."""
    world = ["data.toy.groups=3", "data.val_groups=1", "data.toy.real_share=0.3", f"data.toy.seed={seed}"]
    manifest = generate_toyworld(tmp_path, 3, seed, (32, 48), real_share=0.3)
    trained = {record.source for record in load_manifest(manifest)[:2]}
    if source in trained:
        assert load_config("smoke", [*world, f"data.sources=[{source}]"]).data.sources == [source]
        return
    with pytest.raises(ConfigError, match=rf"data.sources=\[{source}\] keeps no training group") as err:
        load_config("smoke", [*world, f"data.sources=[{source}]"])
    assert err.value.key == "data.sources" and f"data.toy.seed={seed}" in str(err.value)
