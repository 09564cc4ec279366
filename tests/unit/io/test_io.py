"""Lazy reading, OME-Zarr writing (channel names really in `omero`), atomic outputs."""

import json

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from qdquant import io
from qdquant.errors import InputError


def test_ome_tiff_round_trip_is_lazy_and_keeps_pixel_size(tmp_path):
    cube = np.random.default_rng(0).integers(0, 4000, size=(5, 300, 260)).astype(np.uint16)
    path = tmp_path / "slide.ome.tif"
    io.write_ome_tiff(path, da.from_array(cube, chunks=(5, 100, 100)), pixel_size_um=0.37, tile=128)
    read = io.open_cube(path, chunk_size=128)
    assert isinstance(read.data, da.Array)
    assert read.data.chunksize == (5, 128, 128)
    assert read.pixel_size_um == pytest.approx(0.37)
    np.testing.assert_array_equal(read.data.compute(), cube)


def test_a_cube_of_one_chunk_is_decoded_once_and_a_larger_one_stays_lazy(tmp_path):
    """decoded_once holds a one-chunk cube in memory (the file is not read again: it can
    be deleted), with the file's tiling kept for sampling; a cube of several chunks is
    returned as it is."""
    cube = np.random.default_rng(2).integers(0, 4000, size=(4, 300, 260)).astype(np.uint16)
    path = tmp_path / "slide.ome.tif"
    io.write_ome_tiff(path, da.from_array(cube, chunks=(4, 100, 100)), pixel_size_um=0.5, tile=64)
    with io.open_cube(path, chunk_size=512) as read:
        held = io.decoded_once(read)
        file_tiles = read.tiles.chunks
    copy = tmp_path / "copy.ome.tif"
    copy.write_bytes(path.read_bytes())
    with io.open_cube(copy, chunk_size=128) as read:
        assert io.decoded_once(read) is read
    path.unlink()  # only what was decoded can still be read
    assert held.tiles.chunks[1:] == file_tiles[1:] and held.data.chunks == ((4,), (300,), (260,))
    np.testing.assert_array_equal(held.data.compute(), cube)
    np.testing.assert_array_equal(held.tiles[:, 70:130, 5:250:3].compute(), cube[:, 70:130, 5:250:3])
    assert held.pixel_size_um == pytest.approx(0.5) and held.path == path


def test_interleaved_cube_reads_as_cyx(tmp_path):
    cube = np.random.default_rng(1).integers(0, 4000, size=(31, 200, 300)).astype(np.uint16)
    path = tmp_path / "interleaved.ome.tif"
    io.write_ome_tiff(path, da.from_array(cube, chunks=(31, 64, 64)), pixel_size_um=0.5, tile=64, interleaved=True)
    assert tifffile.TiffFile(path).series[0].axes == "YXS"
    assert io.read_cube_header(path)[0] == (31, 200, 300)
    with io.open_cube(path, chunk_size=128) as read:
        assert read.data.shape == (31, 200, 300) and read.data.chunksize == (31, 128, 128)
        np.testing.assert_array_equal(read.data.compute(), cube)


def test_pyramidal_tiff_reads_level_0(tmp_path):
    cube = np.arange(3 * 256 * 256, dtype=np.uint16).reshape(3, 256, 256)
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(cube, subifds=1, tile=(64, 64), photometric="minisblack", metadata={"axes": "CYX"})
        tif.write(cube[:, ::2, ::2], subfiletype=1, tile=(64, 64), photometric="minisblack")
    read = io.open_cube(path, chunk_size=64)
    assert read.data.shape == (3, 256, 256)
    np.testing.assert_array_equal(read.data.compute(), cube)


@pytest.mark.parametrize(
    "content, fragment",
    [(None, "not found"), (b"", "not a readable TIFF"), (b"II*\x00" + b"\x00" * 50, "not a readable TIFF")],
)
def test_bad_files(tmp_path, content, fragment):
    path = tmp_path / "bad.tif"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=fragment) as e:
        io.open_cube(path)
    assert str(path) in str(e.value)


def test_2d_image_is_rejected(tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.zeros((20, 20), np.uint16))
    with pytest.raises(InputError, match=r"\(C, Y, X\)"):
        io.open_cube(path)


def test_ome_zarr_has_named_channels_scale_and_labels(tmp_path):
    image = da.random.random((3, 200, 180), chunks=(3, 64, 64)).astype(np.float32)
    path = tmp_path / "unmixed.ome.zarr"
    io.write_ome_zarr(path, image, ["DAPI", "HER2", "residual"], pixel_size_um=0.5, chunk_size=64)
    attrs = json.loads((path / ".zattrs").read_text())
    assert [c["label"] for c in attrs["omero"]["channels"]] == ["DAPI", "HER2", "residual"]
    assert attrs["multiscales"][0]["version"] == "0.4"
    assert len(attrs["multiscales"][0]["datasets"]) >= 2
    assert io.read_pixel_size_um(path) == 0.5
    data, names = io.read_ome_zarr(path)
    assert names == ["DAPI", "HER2", "residual"]
    np.testing.assert_allclose(data.compute(), image.compute())

    labels = np.zeros((200, 180), np.int32)
    labels[10:30, 10:30] = 7
    io.write_labels(path, {"cells": labels}, chunk_size=64)
    io.write_labels(path, {"nuclei": da.from_array(labels, chunks=50)}, chunk_size=64)
    io.write_labels(path, {"cells": labels * 2}, chunk_size=64)  # rewriting replaces
    assert zarr.open_group(str(path / "labels")).attrs["labels"] == ["nuclei", "cells"]
    back = io.read_labels(path, "cells")
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back.compute(), labels * 2)
    assert not [p for p in (path / "labels").iterdir() if p.name.startswith(".") and "tmp" in p.name]


def test_ome_zarr_pyramid_levels_are_means_of_2x2_pixels(tmp_path):
    """Each coarser level holds the mean of 2x2 pixels of the level above (an abundance's mean
    over the area), truncated at odd edges; stored with zstd."""
    rng = np.random.default_rng(3)
    image = rng.gamma(2.0, 20.0, size=(2, 70, 66)).astype(np.float32)
    path = tmp_path / "unmixed.ome.zarr"
    io.write_ome_zarr(path, da.from_array(image, chunks=(1, 32, 32)), ["A", "B"], pixel_size_um=0.5,
                      chunk_size=32)
    levels = [np.asarray(level) for level in io.read_multiscale(path)]
    assert [lvl.shape for lvl in levels[:3]] == [(2, 70, 66), (2, 35, 33), (2, 17, 16)]
    expected = image[:, :70, :66].reshape(2, 35, 2, 33, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(levels[1], expected, rtol=1e-6)
    np.testing.assert_allclose(levels[2], levels[1][:, :34, :32].reshape(2, 17, 2, 16, 2).mean(axis=(2, 4)),
                               rtol=1e-6)
    assert json.loads((path / "s0" / ".zarray").read_text())["compressor"]["id"] == "zstd"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "table.csv"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_large_cubes_are_written_as_bigtiff(tmp_path, monkeypatch):
    """Past 4 GiB a classic TIFF's offsets overflow: such cubes go to BigTIFF (threshold lowered here)."""
    import tifffile

    from qdquant import io as qio

    cube = np.arange(3 * 40 * 50, dtype=np.uint16).reshape(3, 40, 50)
    qio.write_ome_tiff(tmp_path / "small.ome.tif", cube, pixel_size_um=0.5)
    monkeypatch.setattr(qio.ome_tiff, "BIGTIFF_BYTES", cube.nbytes - 1)
    for interleaved in (False, True):
        path = tmp_path / f"big{interleaved}.ome.tif"
        qio.write_ome_tiff(path, cube, pixel_size_um=0.5, interleaved=interleaved, tile=32)
        with tifffile.TiffFile(path) as tif:
            assert tif.is_bigtiff
        with qio.open_cube(path, chunk_size=32) as read:
            np.testing.assert_array_equal(read.data.compute(), cube)
    with tifffile.TiffFile(tmp_path / "small.ome.tif") as tif:
        assert not tif.is_bigtiff


def test_labels_share_the_images_physical_scale_in_ome_zarr(tmp_path):
    """Opened with ome-zarr's reader, a label image has the image's scale (µm) and units at level
    0, and each of its levels places a pixel where the level-0 pixel it holds lies."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path = tmp_path / "x.ome.zarr"
    image = da.zeros((2, 256, 192), dtype=np.float32, chunks=(1, 64, 64))
    io.write_ome_zarr(path, image, ["a", "b"], pixel_size_um=0.5, chunk_size=64)
    labels = np.arange(256 * 192, dtype=np.int32).reshape(256, 192)
    io.write_labels(path, {"cells": da.from_array(labels, chunks=64)}, chunk_size=64)
    nodes = list(Reader(parse_url(str(path)))())
    image_node = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
    label_node = next(n for n in nodes if any(isinstance(s, Label) for s in n.specs))
    image_scale = image_node.metadata["coordinateTransformations"][0][0]["scale"][-2:]
    label_transforms = label_node.metadata["coordinateTransformations"]
    assert label_transforms[0][0]["scale"] == image_scale == [0.5, 0.5]
    assert [ax.get("unit") for ax in label_node.metadata["axes"]] == ["micrometer", "micrometer"]
    for level, transforms in zip(label_node.data, label_transforms):
        scale, offset = transforms[0]["scale"], transforms[1]["translation"]
        held = np.asarray(level[3, 5])  # the level-0 label at the level-0 pixel this one holds
        y0, x0 = divmod(int(held), 192)
        assert (0.5 * y0, 0.5 * x0) == (scale[0] * 3 + offset[0], scale[1] * 5 + offset[1])


def test_leftovers_of_a_killed_step_are_removed_and_nothing_temporary_enters_the_store(tmp_path):
    path = tmp_path / "s" / "unmixed.ome.zarr"
    io.write_ome_zarr(path, da.zeros((1, 64, 64), dtype=np.float32, chunks=(1, 32, 32)), ["a"],
                      pixel_size_um=0.5, chunk_size=32)
    # what a step killed part-way left: a label image being built inside labels/ (older
    # versions), one beside the store, and a half-written table
    (path / "labels" / ".nuclei.tmp-1234abcd").mkdir(parents=True)
    (tmp_path / "s" / ".unmixed.ome.zarr.labels-tmp-1234abcd").mkdir()
    (tmp_path / "s" / ".cells.tmp-1234abcd.csv").write_text("CellID\n1\n")
    io.write_labels(path, {"nuclei": da.ones((64, 64), dtype=np.int32, chunks=32)}, chunk_size=32)
    io.write_csv(pd.DataFrame({"CellID": [1]}), tmp_path / "s" / "cells.csv")
    left = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert left == ["cells.csv", "unmixed.ome.zarr"], left
    assert sorted(p.name for p in (path / "labels").iterdir() if not p.name.startswith(".z")) == ["nuclei"]
    assert zarr.open_group(str(path / "labels"), mode="r").attrs["labels"] == ["nuclei"]


def test_nuclei_and_cells_appear_together_even_when_their_writer_is_killed(tmp_path):
    """A step SIGKILLed between moving its new nuclei into labels/ and its new cells leaves
    neither readable (not new nuclei beside old cells); the next write gives both."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "s" / "unmixed.ome.zarr"
    io.write_ome_zarr(path, np.zeros((1, 64, 64), np.float32), ["DAPI"], pixel_size_um=0.5, chunk_size=32)
    io.write_labels(path, {"nuclei": np.ones((64, 64), np.int32), "cells": np.ones((64, 64), np.int32)},
                    chunk_size=32)
    killed = f"""
import os, signal
from pathlib import Path
import numpy as np
from qdquant import io

rename = os.replace
def replace(src, dst):
    rename(src, dst)
    if Path(dst).name == "nuclei":  # the new nuclei are in, the new cells not yet
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
new = np.full((64, 64), 2, np.int32)
io.write_labels({str(path)!r}, {{"nuclei": new, "cells": new}}, chunk_size=32)
"""
    src = str(Path(io.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run([sys.executable, "-c", killed], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (path / "labels" / "nuclei").is_dir() and (path / "labels" / "cells").is_dir()  # new and old on disk
    for name in ("nuclei", "cells"):
        with pytest.raises(InputError, match="being replaced.*run the segment step again"):
            io.read_labels(path, name)
    third = np.full((64, 64), 3, np.int32)
    io.write_labels(path, {"nuclei": third, "cells": third}, chunk_size=32)
    for name in ("nuclei", "cells"):
        np.testing.assert_array_equal(io.read_labels(path, name).compute(), third)
    assert zarr.open_group(str(path / "labels"), mode="r").attrs["labels"] == ["nuclei", "cells"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["unmixed.ome.zarr"]  # the killed build removed


def test_channels_are_coloured_by_their_emission_peak(tmp_path):
    from qdquant.colours import channel_colours, emission_colour

    wl = np.arange(420, 741, 10.0)
    peaks = [460, 525, 655, 725]
    spectra = np.column_stack([np.exp(-0.5 * ((wl - p) / 10) ** 2) for p in peaks] + [np.ones(len(wl))])
    colours = channel_colours(spectra, wl)
    rgb = [tuple(int(c[i : i + 2], 16) for i in (0, 2, 4)) for c in colours]
    blue, green, red, deep_red, flat = rgb
    assert blue[2] > max(blue[:2]) and green[1] > max(green[0], green[2])
    assert red[0] == 255 and red[1] == 0 and 0 < deep_red[0] < 255 and deep_red[1:] == (0, 0)
    assert flat == (128, 128, 128)
    assert emission_colour(300) == emission_colour(400) and emission_colour(900) == emission_colour(740)
    path = tmp_path / "x.ome.zarr"
    io.write_ome_zarr(path, da.zeros((2, 32, 32), dtype=np.float32), ["DAPI", "QD655"], pixel_size_um=0.5,
                      colours=colours[::2][:2])
    written = [c["color"] for c in zarr.open_group(str(path), mode="r").attrs["omero"]["channels"]]
    assert written == [colours[0], colours[2]]
    with pytest.raises(InputError, match="1 colours for 2 channels"):
        io.write_ome_zarr(tmp_path / "y.ome.zarr", da.zeros((2, 32, 32), dtype=np.float32), ["a", "b"],
                          pixel_size_um=0.5, colours=["FFFFFF"])


def test_an_image_that_is_a_directory_or_a_link_loop_says_so(tmp_path):
    (tmp_path / "slide.ome.tif").mkdir()
    with pytest.raises(InputError, match="slide.ome.tif: is a directory, not an image file"):
        io.read_cube_header(tmp_path / "slide.ome.tif")
    loop = tmp_path / "loop.ome.tif"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="loop.ome.tif: is a symbolic link loop"):
        io.read_cube_header(loop)
    dangling = tmp_path / "gone.ome.tif"
    dangling.symlink_to(tmp_path / "moved.ome.tif")
    with pytest.raises(InputError, match="gone.ome.tif: is a symbolic link to .*moved.ome.tif, which does not"):
        io.read_cube_header(dangling)
    with pytest.raises(InputError, match="missing.ome.tif: image file not found"):
        io.read_cube_header(tmp_path / "missing.ome.tif")


@pytest.mark.parametrize("damage", ["garbled", "truncated"])
def test_a_corrupt_tile_is_one_line_naming_the_file_and_tile(tmp_path, damage):
    """A tile whose compressed data is garbled or cut off: an InputError naming file and pixels."""
    path = tmp_path / "s.ome.tif"
    cube = np.random.default_rng(0).poisson(100, (8, 256, 256)).astype(np.uint16)
    io.write_ome_tiff(path, cube, pixel_size_um=0.5, tile=64)
    with tifffile.TiffFile(path) as tif:  # the last tile of the last band
        offset, count = tif.pages[7].dataoffsets[-1], tif.pages[7].databytecounts[-1]
    data = bytearray(path.read_bytes())
    if damage == "garbled":
        data[offset + 5 : offset + count] = b"\xff" * (count - 5)
    else:
        data = data[: offset + count // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        with io.open_cube(path, chunk_size=128) as opened:
            opened.data.compute()
    message = str(err.value)
    # a file cut short is caught from its header, before any pixel is decoded
    expected = ("cannot decode the image data at band 7, Y 192-255, X 192-255" if damage == "garbled"
                else "truncated: the image data of band 7 runs to byte")
    assert "\n" not in message and message.startswith(f"{path}: {expected}"), message


@pytest.mark.parametrize("cut", ["inside the tile data", "between pages"])
def test_a_truncated_tiff_is_caught_from_its_header(tmp_path, cut):
    path = tmp_path / "slide.ome.tif"
    cube = np.random.default_rng(0).integers(0, 4000, (6, 128, 128), dtype=np.uint16)
    tifffile.imwrite(path, cube, ome=True, tile=(64, 64), metadata={"axes": "CYX"})
    data = path.read_bytes()
    with tifffile.TiffFile(path) as tif:
        pages = tif.series[0].pages
        fourth = pages[3]
        end_of_third = max(o + n for o, n in zip(pages[2].dataoffsets, pages[2].databytecounts))
        start_of_fourth = min(min(fourth.dataoffsets), fourth.offset)
    # cut inside band 3's tiles, or just after band 2's data (the next page's header is gone)
    keep = (min(fourth.dataoffsets) + 100) if cut == "inside the tile data" else max(end_of_third, start_of_fourth)
    path.write_bytes(data[:keep])
    with pytest.raises(InputError, match=r"slide.ome.tif: truncated"):
        io.read_cube_header(path)


def test_an_output_removes_what_a_killed_step_left_beside_it(tmp_path):
    """A step killed while building a store (or label images beside its temporary name) leaves
    folders that the next write of the same output removes."""
    from qdquant.io import atomic_path

    (tmp_path / ".unmixed.tmp-1234abcd.ome.zarr").mkdir()
    (tmp_path / "..unmixed.tmp-1234abcd.ome.zarr.labels-tmp-99999999").mkdir()
    with atomic_path(tmp_path / "unmixed.ome.zarr") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unmixed.ome.zarr"]


def test_stores_keep_viewer_sized_chunks_and_steps_read_their_chunk_size(tmp_path):
    """A 2048 px processing chunk is stored as 1024 px chunks (a viewer reads a whole stored chunk
    for any pixel of it); the steps read 2048 px dask chunks of them, and every value round-trips."""
    assert [io.store_chunk(c) for c in (2048, 4096, 1024, 512, 1500, 300)] == [1024, 1024, 1024, 512, 750, 300]
    for c in (2048, 1500, 4096, 997):
        assert c % io.store_chunk(c) == 0  # no two processing chunks share a stored one
    rng = np.random.default_rng(1)
    image = rng.random((2, 2100, 40)).astype(np.float32)
    path = tmp_path / "unmixed.ome.zarr"
    io.write_ome_zarr(path, da.from_array(image, chunks=(1, 2048, 2048)), ["A", "residual"], pixel_size_um=0.5,
                      chunk_size=2048)
    labels = rng.integers(0, 50, size=(2100, 40)).astype(np.int32)
    io.write_labels(path, {"cells": labels}, chunk_size=2048)
    assert zarr.open_group(str(path), mode="r")["s0"].chunks == (1, 1024, 1024)
    assert zarr.open_group(str(path / "labels" / "cells"), mode="r")["s0"].chunks == (1024, 1024)
    read, _ = io.read_ome_zarr(path, 2048)
    assert read.chunks == ((1, 1), (2048, 52), (40,))
    np.testing.assert_array_equal(read.compute(), image)
    cells = io.read_labels(path, "cells", 2048)
    assert cells.chunks == ((2048, 52), (40,))
    np.testing.assert_array_equal(cells.compute(), labels)
    assert io.read_labels(path, "cells").chunks == ((1024, 1024, 52), (40,))


@pytest.mark.parametrize("odd", [
    {},  # written by qdquant itself
    {"note": ["a,b", 'say "hi"', "x", None]},  # fields csv quotes, and a missing text: left to pandas
    {"f32": np.float32([0.1, 1e-5, np.nan, 3])},
    {"kind": pd.Categorical(["a", "b", "a", "b"])},
])
def test_tables_are_written_byte_for_byte_as_pandas_writes_them(tmp_path, odd):
    rng = np.random.default_rng(0)
    # every kind of float64: random bit patterns (subnormals, huge, NaN payloads) and the edges of repr's layout
    floats = np.concatenate([rng.integers(0, 2**64, 4000, dtype=np.uint64).view(np.float64),
                             [0.0, -0.0, np.inf, -np.inf, np.nan, 1e16, 9999999999999998.0, 1e-4, 9.9e-5, 5e-324]])
    n = len(floats)
    table = pd.DataFrame({"CellID": np.arange(n), "x": floats, "n": rng.integers(-2**63, 2**63 - 1, n),
                          "u": rng.integers(0, 2**64 - 1, n, dtype=np.uint64), "is_tumour": rng.random(n) > 0.5,
                          "her2_class": rng.choice(["0", "1+", "2+", "3+", "", "é"], n)})
    for name, values in odd.items():
        table[name] = np.resize(np.asarray(values, dtype=object if name == "note" else None), n)
        if name == "kind":
            table[name] = pd.Categorical(table[name])
    # qdquant's own tables take the quick way, the rest are left to pandas
    assert (io.tables._csv_text(table, header=True) is None) == bool(odd)
    slices = [table.iloc[:1000], table.iloc[1000:1000], table.iloc[1000:]]
    io.write_csv_slices(iter(slices), tmp_path / "fast.csv")
    table.to_csv(tmp_path / "pandas.csv", index=False)
    assert (tmp_path / "fast.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()
