"""Label images (nuclei, cells, flagged pixels) under ``{store}/labels/`` of an OME-Zarr."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import dask.array as da
import zarr

from qdquant.config.defaults import default
from qdquant.errors import InputError
from qdquant.io.atomic import _remove_stale, scratch_dir
from qdquant.io.ome_zarr import _dask_chunks, _first_dataset, pyramid_factors, store_chunk


def write_labels(
    zarr_path: str | os.PathLike,
    labels: dict,
    *,
    chunk_size: int = default("chunk_size"),
    group_metadata: bool = True,
) -> None:
    """Write (Y, X) integer label images under ``{zarr_path}/labels/{name}``.

    ``labels`` maps names to numpy or dask arrays; they are computed together
    in one pass (label images that share a lazy graph, as nuclei and cells
    do, are segmented once) and staged at full resolution in a temporary
    directory (``$TMPDIR``), from which the pyramid is then built: the peak
    memory is that of the larger of the two passes, not of both at once.
    They are built beside the store (``.{store}.labels-tmp-*``) and moved
    into ``labels/`` together when all are complete (:func:`_commit`), so
    readers never see a partial label image, nor one of the images written
    together (nuclei and cells) without the other; nothing temporary is
    ever inside the store; leftovers of a killed step are removed first.
    Every level carries the image's physical scale (µm) and axis units.

    The ``labels`` group's own metadata (``labels/.zgroup``, and ``labels/.zattrs``
    listing every label image in it) is written too; with
    ``group_metadata=False`` it is not (the unmix step's ``flagged``: the
    segment step writes the group's metadata, and each step only its own files).
    """
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_label_metadata, write_multiscale

    zarr_path = Path(zarr_path).absolute()  # dask tasks write here, maybe from another directory
    root = zarr.open_group(str(zarr_path), mode="r+")
    # Label images are built beside the store, not in it, and moved in when complete; what a
    # killed step left there (or, from older versions, inside labels/) goes first.
    _remove_stale(zarr_path.parent, f".{zarr_path.name}.labels-tmp-*")
    _remove_stale(zarr_path / "labels", ".*.tmp-*")
    building = zarr_path.parent / f".{zarr_path.name}.labels-tmp-{uuid.uuid4().hex[:8]}"
    building_root = zarr.open_group(str(building), mode="w", zarr_format=2)
    staging = scratch_dir(zarr_path.parent, prefix="qdquant-labels-")
    try:
        staged = {}
        for name, image in labels.items():
            staged[name] = zarr.open_array(
                str(Path(staging.name) / name), mode="w", shape=image.shape, dtype=image.dtype,
                chunks=(chunk_size, chunk_size), fill_value=0,
            )
        # Dask chunks on the Zarr chunks, so that no two tasks write one chunk (no lock needed).
        da.store([da.asarray(image).rechunk((chunk_size, chunk_size)) for image in labels.values()],
                 list(staged.values()), lock=False)
        if group_metadata:
            root.require_group("labels")  # where the finished label images move
        (zarr_path / "labels").mkdir(exist_ok=True)
        # the image's own physical scale per level, so that labels land on the image in any viewer
        image_levels = root.attrs["multiscales"][0]["datasets"]
        spatial = [ax.get("unit") for ax in root.attrs["multiscales"][0]["axes"]][-2:]
        axes = [{"name": a, "type": "space", **({"unit": u} if u else {})} for a, u in zip("yx", spatial)]
        for name, level0 in staged.items():
            # Nearest-neighbour levels, each read from the staged level 0 and
            # written in turn, so that no level waits in memory for another.
            factors = pyramid_factors(level0.shape)
            pyramid = [da.from_zarr(level0)] + [
                da.from_zarr(level0)[f // 2 :: f, f // 2 :: f].rechunk(chunk_size) for f in factors
            ]
            # level k holds level 0's pixels f // 2, f // 2 + f, ... (f = 2**k): its scale is the image's
            # at that level, its origin the physical position of pixel f // 2
            base = image_levels[0]["coordinateTransformations"][0]["scale"][-2:]
            transforms = [[{"type": "scale", "scale": [b * f for b in base]},
                           {"type": "translation", "translation": [b * (f // 2) for b in base]}]
                          for f in [1, *factors]]
            group = building_root.require_group(name)
            write_multiscale(pyramid, group, fmt=FormatV04(), axes=axes, name=name,
                             storage_options={"chunks": (store_chunk(chunk_size),) * 2})
            # set here: ome-zarr's scale argument cannot say where a level's pixels lie
            multiscales = group.attrs["multiscales"]
            for dataset, transform in zip(multiscales[0]["datasets"], transforms):
                dataset["coordinateTransformations"] = transform
            group.attrs["multiscales"] = multiscales
            write_label_metadata(building_root, name, fmt=FormatV04())
        _commit(zarr_path / "labels", building, list(labels), group_metadata=group_metadata)
    finally:
        staging.cleanup()
        shutil.rmtree(building, ignore_errors=True)  # with the images the new ones replaced


def _commit(folder: Path, building: Path, names: list[str], *, group_metadata: bool) -> None:
    """Move the label images ``names`` from ``building`` into ``folder`` (``labels/``) together.

    The labels group lists its images (``labels/.zattrs``, which OME-Zarr
    readers and :func:`read_labels` go by): ``names`` leave the list before
    the first of them is replaced and come back after the last, each list
    written whole by a rename, so a reader finds all of them new or, while
    they move (or after a step killed then), none of them -- never new
    nuclei beside old cells. Each image moves by two renames (the old one
    into ``building``, which is removed after, then the new one in).
    """
    listed = _listed(folder)
    if group_metadata and listed is not None:
        _write_listed(folder, [n for n in listed if n not in names])
    for name in names:
        final = folder / name
        if final.exists():
            os.replace(final, building / f".old-{name}")
        os.replace(building / name, final)
    if group_metadata and (folder / ".zgroup").is_file():
        known = [n for n in listed or [] if n not in names]
        known += sorted(p.name for p in folder.iterdir()  # written without the group's metadata
                        if (p / ".zattrs").is_file() and p.name not in known and p.name not in names)
        _write_listed(folder, known + names)


def _listed(folder: Path) -> list[str] | None:
    """The label images the labels group ``folder`` lists (None when it lists none: no metadata yet)."""
    try:
        return json.loads((folder / ".zattrs").read_text()).get("labels")
    except FileNotFoundError:
        return None


def _write_listed(folder: Path, names: list[str]) -> None:
    """Set the labels group's list of images, in one rename (a reader sees the old list or the new)."""
    path = folder / ".zattrs"
    attrs = json.loads(path.read_text()) if path.is_file() else {}
    tmp = folder / f".zattrs.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({**attrs, "labels": names}, indent=4))
    os.replace(tmp, path)


def read_labels(zarr_path: str | os.PathLike, name: str, chunk_size: int | None = None) -> da.Array:
    """Level 0 of ``{zarr_path}/labels/{name}`` as a (Y, X) dask array (``chunk_size``² per chunk;
    the stored chunks when None)."""
    path = Path(zarr_path) / "labels" / name
    if not path.is_dir():
        raise InputError(f"{path}: label image not found (run the segment step first)")
    listed = _listed(path.parent)
    if listed is not None and name not in listed:  # see _commit
        raise InputError(f"{path}: label image being replaced, or its step was stopped while replacing it "
                         "(run the segment step again)")
    group = zarr.open_group(str(path.absolute()), mode="r")  # absolute: read by workers elsewhere
    array = group[_first_dataset(group)]
    return da.from_zarr(array, chunks=_dask_chunks(array, chunk_size))
