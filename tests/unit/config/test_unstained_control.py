"""An unstained control slide named in the sample sheet: the checks load_config makes."""

import numpy as np
import pandas as pd
import pytest

from conftest import write_project
from qdquant import io
from qdquant.config import load_config
from qdquant.errors import InputError


def test_sheet_errors(tmp_path):
    config = write_project(tmp_path / "p")
    root = config.parent
    sheet = root / "samples.tsv"
    image = root / "s1.ome.tif"
    # the tiny panel has no autofluorescence row
    sheet.write_text(f"sample_id\timage\tunstained\ns1\t{image}\t{image}\n")
    with pytest.raises(InputError, match="role autofluorescence"):
        load_config(config)
    library = pd.read_csv(root / "spectra.csv")
    library["AF"] = np.linspace(1.0, 0.2, len(library))
    library.to_csv(root / "spectra.csv", index=False)
    (root / "panel.tsv").write_text((root / "panel.tsv").read_text() + "AF\tAF\tautofluorescence\t\tnone\t\t\t\n")
    sheet.write_text(f"sample_id\timage\tunstained\ns1\t{image}\t{root / 'missing.ome.tif'}\n")
    with pytest.raises(InputError, match="missing.ome.tif"):
        load_config(config, check_images=True)
    io.write_ome_tiff(root / "five_bands.ome.tif", np.ones((5, 16, 16), np.uint16), pixel_size_um=0.5)
    sheet.write_text(f"sample_id\timage\tunstained\ns1\t{image}\t{root / 'five_bands.ome.tif'}\n")
    with pytest.raises(InputError, match=r"five_bands.ome.tif: 5 bands .*unstained control"):
        load_config(config, check_images=True)
