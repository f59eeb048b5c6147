"""Streamed real data: image folders, WebDataset shards, the deterministic and resumable stream."""

from __future__ import annotations

import gc
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmd2_train.data import DataError
from dmd2_train.datasets import Sample, first_readable, image_source
from dmd2_train.stream import EpochOrder, RealStream, StreamBatch, StreamPlan, StreamReader


def encoded(fmt: str = "PNG", seed: int = 0, size: tuple[int, int] = (20, 16)) -> bytes:
    """A random RGB image (height, width) encoded as ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def truncated_jpeg() -> bytes:
    data = encoded("JPEG", seed=9, size=(32, 32))
    return data[: len(data) // 2]


def write_captioned_folder(root: Path) -> Path:
    """Nested folders: captions from metadata.csv (root), metadata.jsonl (b/c) and a .txt; one
    truncated JPEG; one image with no caption anywhere; a hidden folder that is not data."""
    for sub in ("a", "b/c", ".cache"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "a" / "one.png").write_bytes(encoded(seed=1))
    (root / "a" / "two.jpg").write_bytes(truncated_jpeg())
    (root / "metadata.csv").write_text("file_name,text\na/one.png,a red cube\na/two.jpg,a broken file\n")
    (root / "b" / "three.png").write_bytes(encoded(seed=3, size=(16, 30)))
    (root / "b" / "three.txt").write_text("a small dog\n")
    (root / "b" / "four.jpg").write_bytes(encoded("JPEG", seed=4))  # no caption
    (root / "b" / "c" / "five.webp").write_bytes(encoded("WEBP", seed=5))
    (root / "b" / "c" / "metadata.jsonl").write_text(json.dumps({"file_name": "five.webp", "text": "a city"})
                                                     + "\n{not json\n")  # a damaged row: warned, not fatal
    (root / ".cache" / "six.png").write_bytes(encoded(seed=6))
    return root


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard: for each (key, {extension: bytes}) the members ``key.extension``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder: Path) -> Path:
    """Two shards: one with a corrupt image and an uncaptioned one, one cut inside an image."""
    write_shard(folder / "shard-000.tar", [
        ("s/000", {"jpg": encoded("JPEG", seed=10), "txt": b"a red cube"}),
        ("s/001", {"png": encoded(seed=11), "json": json.dumps({"caption": "a small dog"}).encode()}),
        ("s/002", {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"corrupt"}),
        ("s/003", {"png": encoded(seed=13)}),
    ])
    whole = write_shard(folder / "cut.tmp", [("t/000", {"png": encoded(seed=20), "txt": b"a city at night"}),
                                            ("t/001", {"png": encoded(seed=21, size=(64, 64)), "txt": b"cut"})])
    data = whole.read_bytes()
    whole.unlink()
    offset = data.index(b"t/001.png") + 512  # the second image's data starts one header block later
    (folder / "shard-001.tar").write_bytes(data[: offset + 200])
    return folder


def test_image_folder_is_read_recursively_with_its_captions(tmp_path: Path):
    root = write_captioned_folder(tmp_path / "images")
    source = image_source(root, 16, 3)
    assert source.files == ["a/one.png", "a/two.jpg", "b/c/five.webp", "b/four.jpg", "b/three.png"]
    captions = {}
    for k, name in enumerate(source.files):
        if name == "a/two.jpg":
            with pytest.raises(OSError):
                source.read(0, k)
            continue
        sample = source.read(0, k)
        assert sample.pixels.shape == (3, 16, 16) and -1 <= sample.pixels.min() and sample.pixels.max() <= 1
        captions[name] = sample.caption
    assert captions == {"a/one.png": "a red cube", "b/c/five.webp": "a city", "b/four.jpg": "",
                        "b/three.png": "a small dog"}
    # one pass over the folder: the truncated JPEG skipped and counted, the uncaptioned image counted
    batch = RealStream(source, first_readable(source), StreamPlan(batch=5, seed=0)).batch_at(0)
    assert batch.skipped == 1 and batch.uncaptioned == 1 and len(batch.skips) == 1 and "a/two.jpg" in batch.skips[0]
    assert batch.pixels.shape == (5, 3, 16, 16) and set(batch.captions) <= set(captions.values())


def test_webdataset_shards_skip_corrupt_and_truncated_members(tmp_path: Path):
    folder = write_shards(tmp_path / "shards")
    for where in (folder, folder / "*.tar", folder / "shard-{000..001}.tar"):
        source = image_source(where, 16, 3)
        assert source.unit_sizes == [4, 2]
    assert image_source(folder / "shard-000.tar", 16, 3).unit_sizes == [4]
    shouting = Path(shutil.copy(folder / "shard-000.tar", tmp_path / "SHARD.TAR"))  # was "not a .tar shard"
    assert image_source(shouting, 16, 3).unit_sizes == [4] and image_source(tmp_path / "*.TAR", 16, 3).unit_sizes == [4]
    assert source.read(0, 0).caption == "a red cube" and source.read(0, 1).caption == "a small dog"
    assert source.read(0, 3).caption == "" and source.read(1, 0).pixels.shape == (3, 16, 16)
    with pytest.raises(OSError):
        source.read(0, 2)  # not an image
    with pytest.raises(EOFError, match="truncated"):
        source.read(1, 1)
    batch = RealStream(source, first_readable(source), StreamPlan(batch=6, seed=0)).batch_at(0)
    assert batch.skipped == 2 and batch.uncaptioned == 1 and len(batch.captions) == 6


def test_a_shard_cut_or_damaged_inside_a_header_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """tarfile ends a listing quietly at a header it cannot read: the shard's loss is said, not hidden."""
    from dmd2_train.datasets import tar_samples

    whole = write_shard(tmp_path / "whole.tar", [(f"s/{i:03d}", {"png": encoded(seed=i), "txt": b"a cube"})
                                                 for i in range(3)])
    assert len(tar_samples(whole, warn=True)) == 3 and capsys.readouterr().err == ""  # its zero blocks: a clean end
    data = whole.read_bytes()
    second = data.index(b"s/001.png")  # the header of the second sample's image
    (tmp_path / "cut.tar").write_bytes(data[: second + 100])  # cut inside that header
    damaged = bytearray(data)
    damaged[second + 148: second + 156] = b"garbage!"  # its checksum field
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    for name in ("cut.tar", "damaged.tar"):
        assert len(tar_samples(tmp_path / name, warn=True)) == 1
        err = capsys.readouterr().err
        assert f"{name}: a damaged or cut header at byte {second}" in err and "the rest of the shard is skipped" in err


def test_a_caption_that_is_not_utf8_skips_its_sample_by_name(tmp_path: Path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(encoded(seed=1))
    (root / "ok.txt").write_text("a café", encoding="utf-8")
    (root / "latin.png").write_bytes(encoded(seed=2))
    (root / "latin.txt").write_bytes("a café".encode("latin-1"))  # was read as 'a caf\ufffd' and trained on
    source = image_source(root, 16, 3)
    assert source.read(0, source.files.index("ok.png")).caption == "a café"
    with pytest.raises(ValueError, match=r"its .txt caption is not UTF-8 text \(byte 5\)"):
        source.read(0, source.files.index("latin.png"))


def test_a_source_with_nothing_readable_is_one_line(tmp_path: Path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(DataError, match="no images .* found in") as err:
        image_source(bad, 16, 3)
    (bad / "x.jpg").write_bytes(truncated_jpeg())
    (bad / "y.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 2 samples of the image folder .* can be read") as err:
        first_readable(image_source(bad, 16, 3))
    assert "\n" not in str(err.value) and "x.jpg" in str(err.value)
    with pytest.raises(DataError, match="do not exist"):
        image_source(tmp_path / "missing", 16, 3)
    with pytest.raises(DataError, match="no .tar shards match"):
        image_source(tmp_path / "*.tar", 16, 3)


class CountingSource:
    """Sample (u, k) is an image filled with its global index; every ``bad``-th one is unreadable."""

    where = "test source"

    def __init__(self, sizes: list[int], bad: int = 0) -> None:
        self.unit_sizes, self.bad = sizes, bad
        self.starts = np.cumsum([0, *sizes])

    def name_of(self, unit: int, k: int) -> str:
        return f"{unit}/{k}"

    def read(self, unit: int, k: int) -> Sample:
        i = int(self.starts[unit] + k)
        if self.bad and i % self.bad == self.bad - 1:
            raise OSError("damaged")
        return Sample(f"sample {i}" if i % 4 else "", pixels=torch.full((1, 2, 2), float(i)))


def test_order_is_a_permutation_per_epoch_split_across_processes():
    sizes = [3, 0, 4, 2]
    order = EpochOrder(sizes, seed=1)
    every = {(u, k) for u, n in enumerate(sizes) for k in range(n)}
    epochs = [[order.locate(e * 9 + i) for i in range(9)] for e in range(3)]
    assert all(set(epoch) == every for epoch in epochs) and epochs[0] != epochs[1]
    assert [EpochOrder(sizes, seed=1).locate(i) for i in range(9)] == epochs[0]  # a function of the seed
    source = CountingSource(sizes)
    seen = []
    for rank in range(3):  # 3 processes, batches of 3: one epoch is one batch each
        batch = RealStream(source, (0, 0), StreamPlan(batch=3, seed=1, rank=rank, world=3)).batch_at(0)
        seen += batch.pixels[:, 0, 0, 0].tolist()
    assert sorted(seen) == list(range(9))


def test_resumed_stream_continues_exactly(tmp_path: Path):
    source = CountingSource([5, 7, 3], bad=6)
    plan = StreamPlan(batch=4, seed=3, workers=2, prefetch=2)

    def reader() -> StreamReader:
        return StreamReader(source, (0, 0), plan, lambda b: (b.pixels, b.pixels + 0.5))

    straight = reader()
    whole = [straight.take(4) for _ in range(9)]  # more than two epochs, unreadable samples included
    first, state = reader(), None
    before = [first.take(4) for _ in range(3)] + [first.take(1)]  # stopped mid-batch
    state = first.state()
    first.close()
    second = reader()
    second.restore(state)
    after = [second.take(3)] + [second.take(4) for _ in range(5)]
    flat = torch.cat([m for m, _, _ in whole])
    resumed = torch.cat([m for m, _, _ in before + after])
    assert torch.equal(flat, resumed)
    assert [c for _, _, caps in whole for c in caps] == [c for _, _, caps in before + after for c in caps]
    assert straight.state()["skipped"] == second.state()["skipped"] > 0  # skips counted once, across the resume
    assert straight.state()["uncaptioned"] == second.state()["uncaptioned"] > 0
    assert torch.equal(torch.cat([s for _, s, _ in whole]), flat + 0.5)
    straight.close()
    second.close()


def test_the_first_five_unreadable_samples_are_named(capsys: pytest.CaptureFixture[str]):
    """Several in one batch too: each is named until five are, then they are only counted."""
    reader = StreamReader(CountingSource([40], bad=2), (0, 0), StreamPlan(batch=8, seed=0, workers=0),
                          lambda b: (b.pixels, b.pixels))
    reader.take(16)  # two batches of a shuffled order, half of it unreadable
    named = [line for line in capsys.readouterr().err.splitlines() if "skipped an unreadable sample" in line]
    assert reader.state()["skipped"] > 5 and len(named) == 5 and len(set(named)) == 5
    reader.close()
    # a small source read for several epochs: each unreadable sample named once, not five lines of two files
    reader = StreamReader(CountingSource([4], bad=2), (0, 0), StreamPlan(batch=4, seed=0, workers=0),
                          lambda b: (b.pixels, b.pixels))
    reader.take(16)
    named = [line for line in capsys.readouterr().err.splitlines() if "skipped an unreadable sample" in line]
    assert reader.state()["skipped"] == 8 and len(named) == 2 and len(set(named)) == 2
    reader.close()


def test_a_source_that_becomes_unreadable_is_one_line_from_a_worker():
    source = CountingSource([4], bad=1)  # every sample, the probe's fallback included
    reader = StreamReader(source, (0, 0), StreamPlan(batch=2, seed=0, workers=1), lambda b: (b.pixels, b.pixels))
    with pytest.raises(DataError) as err:
        reader.take(2)
    assert str(err.value).startswith("the test source has become unreadable (0/0: damaged)") and "\n" not in str(err.value)
    reader.close()


def test_sixteen_bit_grey_is_scaled_not_clipped_to_white():
    """Pillow's convert clips a 16-bit PNG's 0..65535 at 255: a mid grey came out white, in training
    data and in the server's image-to-image uploads alike."""
    from dmd2_serve.server.images import load_image as upload
    from dmd2_train.datasets import load_image

    def png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()

    deep = png(Image.fromarray(np.full((8, 8), 0x4000, np.uint16)))  # a quarter grey, 16 bits
    assert Image.open(io.BytesIO(deep)).mode.startswith("I")
    shallow = png(Image.fromarray(np.full((8, 8), 64, np.uint8)))  # the same grey, 8 bits
    for channels in (3, 1):
        assert torch.equal(load_image(deep, 8, channels), load_image(shallow, 8, channels))
        assert np.array_equal(upload(deep, (8, 8), channels), upload(shallow, (8, 8), channels))
    assert upload(deep, (8, 8), 3)[0, 0].tolist() == [64, 64, 64]


def test_metadata_paths_written_on_windows_and_rows_naming_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A backslash path (written on Windows) and a row naming a file that is not there were dropped
    silently: their images trained uncaptioned."""
    from dmd2_train.datasets import ImageFolderSource

    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "d.png")
    rows = [{"file_name": "sub\\d.png", "text": "a digit"}, {"file_name": "gone.png", "text": "lost"}]
    (tmp_path / "metadata.jsonl").write_text("\ufeff" + "\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    source = ImageFolderSource(tmp_path, [tmp_path / "sub" / "d.png"], 8, 3)
    assert source.read(0, 0).caption == "a digit"  # the BOM did not spoil the first row either
    assert "1 metadata rows name files that are not there (first: 'gone.png')" in capsys.readouterr().err


def test_a_dropped_reader_s_loader_is_never_cyclic_garbage(tmp_path: Path):
    """A reader is in a reference cycle (RunBatches holds it; it holds RunBatches' to_latents). The cyclic GC
    took its DataLoader iterator's queues down before the iterator's __del__ asked the workers to stop, so each
    worker's join waited its 5 s timeout: 76 s of one test in the suite, and seconds of a run wherever the GC
    happened to run. The iterator must go whole, after the reader, by its reference count."""
    source = image_source(write_shards(tmp_path / "shards"), 16, 3)

    class Owner:  # as RunBatches
        def __init__(self) -> None:
            self.reader = StreamReader(source, first_readable(source), StreamPlan(batch=2, seed=0, workers=2),
                                       self.latents)

        def latents(self, batch: StreamBatch) -> tuple[torch.Tensor, torch.Tensor]:
            return batch.pixels, batch.pixels

    owner = Owner()
    owner.reader.take(2)  # the workers start
    del owner
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector found unreachable, kept in gc.garbage to look at
    try:
        gc.collect()
        found = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert "StreamReader" in found and "_MultiProcessingDataLoaderIter" not in found
