"""``qdquant view``: what it says when napari or the results are missing (the viewer on a
pipeline run: tests/integration/test_viewer.py)."""

from __future__ import annotations

import builtins

import pytest

from qdquant.cli import main

pytest.importorskip("napari")


def test_view_without_napari_names_the_extra(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_napari(name, *args, **kwargs):
        if name == "napari" or name.startswith("napari."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_napari)
    assert main(["view", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['qdquant: error: napari is not installed: pip install "qdquant[napari]"']


def test_view_of_a_folder_without_results_is_one_line(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "not a sample's results folder" in err[0]
