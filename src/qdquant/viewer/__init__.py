"""The napari face of qdquant: a reader for a sample's results and a HER2 scoring widget.

``qdquant view RESULTS/SAMPLE`` opens both. napari is an optional extra
(``pip install "qdquant[napari]"``); nothing here imports it at import time.
"""
