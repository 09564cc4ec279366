"""``qdquant view``: napari with a sample's layers and the HER2 scoring widget."""

from __future__ import annotations

from qdquant.errors import InputError
from qdquant.viewer.results import locate

__all__ = ["open_results"]

NAPARI_MISSING = 'napari is not installed: pip install "qdquant[napari]"'


#: napari keeps chunks it has read in a cache (a quarter of the machine's memory by default); a
#: whole slide's stored chunks are a few MB, so this holds several screenfuls of every layer.
DASK_CACHE_MB = 256


def open_results(path, viewer=None, *, cache_mb: int = DASK_CACHE_MB):
    """Open a sample's results (``results/SAMPLE`` or an ``unmixed.ome.zarr``) in a napari viewer.

    Parameters
    ----------
    path : str or os.PathLike
        The sample's results folder or its ``unmixed.ome.zarr``.
    viewer : napari.Viewer, optional
        The viewer to add to; a new one when None.
    cache_mb : int, optional
        Size of napari's cache of read chunks (MiB), for the whole napari session.

    Returns
    -------
    (napari.Viewer, Her2Widget)
    """
    try:
        import napari
    except ImportError:
        raise InputError(NAPARI_MISSING) from None
    if locate(path) is None:
        raise InputError(f"{path}: not a sample's results folder (results/SAMPLE, with unmixed.ome.zarr) "
                         "or an unmixed.ome.zarr")
    from napari.utils import resize_dask_cache

    from qdquant.viewer.reader import read_results
    from qdquant.viewer.widget import Her2Widget

    viewer = napari.Viewer(title=f"qdquant: {locate(path).sample_id}") if viewer is None else viewer
    # after the viewer: making its window sets the cache to napari's own setting (a quarter of the
    # machine's memory by default)
    resize_dask_cache(cache_mb * 2**20)
    for data, kwargs, kind in read_results(path):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = Her2Widget(viewer)
    viewer.window.add_dock_widget(widget, name="HER2 scoring", area="right")
    viewer.canvas.overlays.scale_bar.visible = True  # in µm, the layers' unit
    return viewer, widget
