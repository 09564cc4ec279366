"""``qdquant view``: napari with a sample's layers and the HER2 scoring widget."""

from __future__ import annotations

import gc

from qdquant.errors import InputError
from qdquant.viewer.results import locate

__all__ = ["open_results"]

NAPARI_MISSING = 'napari is not installed: pip install "qdquant[napari]"'


#: napari keeps chunks it has read in a cache (a quarter of the machine's memory by default). A
#: full-resolution screenful of the visible layers (1400 x 900 window) is about 90 MB of 512² parts
#: of stored chunks (1 MB each) plus the contours' neighbouring parts: this keeps about one, so that
#: a pan reads only what comes into view, and a whole slide's view with its tables stays under 1 GiB.
DASK_CACHE_MB = 128


def _cached_unit_registry() -> None:
    """Let pint keep its parsed unit definitions on disk (its ``cache_folder``), as napari's layers
    need pint: building the registry from its text definitions takes about 0.5 s at every start,
    loading the cached one 0.05 s.

    Only while pint's application registry is still the untouched lazy one (nothing holds a unit
    of it yet); anything going wrong leaves pint as it was.
    """
    try:
        import pint
        from pint.registry import LazyRegistry

        if not isinstance(pint.get_application_registry().get(), LazyRegistry):
            return
        pint.set_application_registry(pint.UnitRegistry(cache_folder=":auto:"))
    except Exception:  # noqa: BLE001 (a read-only cache folder, another pint: napari builds its own)
        return


def _own_process_settings() -> None:
    """Settings for a process that is only this viewer (``qdquant view``), not a napari session
    the user runs other work in.

    dask looks for a ``distributed`` client at every compute, and importing ``distributed`` to
    look (it is installed with the pipeline's cluster extra) costs 0.14 s and 15 MB: name dask's
    threaded scheduler, the one it would fall back to, instead.
    """
    import dask
    import dask.threaded

    if dask.config.get("scheduler", None) is None:
        dask.config.set(scheduler=dask.threaded.get)


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
    results = locate(path)
    if results is None:
        raise InputError(f"{path}: not a sample's results folder (results/SAMPLE, with unmixed.ome.zarr) "
                         "or an unmixed.ome.zarr")
    from napari.utils import resize_dask_cache

    # Opening makes about 400 000 long-lived objects (napari, Qt, vispy) and hardly any garbage, but
    # Python's collector goes through all of them again and again as they come: 6-8 full
    # collections, about 1 s in all on a loaded 2-core machine. It is off till opening is done, and what opening made then goes
    # to the oldest generation as it is (gc.freeze + unfreeze) instead of through the younger two.
    collecting = gc.isenabled()
    gc.disable()
    try:
        from qdquant.viewer.layers import results_layers
        from qdquant.viewer.widget import Her2Widget

        _cached_unit_registry()
        if viewer is None:
            _own_process_settings()
            viewer = napari.Viewer(title=f"qdquant: {results.sample_id}")
        # after the viewer: making its window sets the cache to napari's own setting (a quarter of
        # the machine's memory by default)
        resize_dask_cache(cache_mb * 2**20)
        layers = results_layers(results)
        # napari selects each layer as it comes, and its layer controls switch to it (0.3 s for
        # 14 layers): select only the last one, once
        activates = getattr(viewer.layers, "_activate_on_insert", None) is True
        if activates:
            viewer.layers._activate_on_insert = False
        try:
            # one scene-graph update for all the layers (napari redoes it, and every layer's
            # overlays, at each layer added otherwise) ...
            with viewer.layers.batched_update():
                for data, kwargs, kind in layers:
                    getattr(viewer, f"add_{kind}")(data, **kwargs)
                # ... and its end runs gc.collect() (to free the textures of removed layers: there
                # are none) through all those objects, which need no collecting: 0.2-0.4 s
                gc.freeze()
        finally:
            if activates:
                viewer.layers._activate_on_insert = True
        if activates and len(viewer.layers):
            viewer.layers.selection.active = viewer.layers[-1]
        widget = Her2Widget(viewer)
        viewer.window.add_dock_widget(widget, name="HER2 scoring", area="right")
        viewer.canvas.overlays.scale_bar.visible = True  # in µm, the layers' unit
    finally:
        gc.freeze()
        gc.unfreeze()
        if collecting:
            gc.enable()
    return viewer, widget
