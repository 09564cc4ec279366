"""Every bad input to the configuration is a one-line InputError naming the file, row or key."""

from pathlib import Path

import pytest
import yaml

from qdquant.config import load_config
from qdquant.errors import InputError


def edit_yaml(path: Path, **changes):
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))


def assert_one_line(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_valid_project_loads_with_defaults(tiny_project):
    cfg = load_config(tiny_project, check_images=True)
    assert [s.sample_id for s in cfg.samples] == ["s1"]
    assert cfg.library.names == ("DAPI", "QD565", "QD655", "Offset")
    assert cfg.chunk_size == 2048 and cfg.segmentation.membrane_width_px == 2
    assert cfg.her2.t_faint == 20 and not cfg.her2.thresholds_explicit
    assert [r.marker for r in cfg.measured] == ["DAPI", "ER", "HER2"]


def test_unknown_key(tiny_project):
    edit_yaml(tiny_project, colour="red")
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, str(tiny_project), "unknown key", "'colour'")


def test_unknown_nested_key_and_wrong_type(tiny_project):
    edit_yaml(tiny_project, segmentation={"nucleus_diameter": 8})
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "nucleus_diameter", "segmentation")
    edit_yaml(tiny_project, segmentation={"nucleus_diameter_um": "big"})
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "segmentation.nucleus_diameter_um")
    edit_yaml(tiny_project, segmentation={"nucleus_diameter_um": -3})
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "segmentation.nucleus_diameter_um", "'auto' or a number > 0")


def test_nucleus_diameter_auto_or_a_hint(tiny_project):
    assert load_config(tiny_project).segmentation.nucleus_diameter_um == "auto"  # the default
    edit_yaml(tiny_project, segmentation={"nucleus_diameter_um": 8})
    assert load_config(tiny_project).segmentation.nucleus_diameter_um == 8  # a hint
    edit_yaml(tiny_project, segmentation={"nucleus_diameter_um": "auto"})
    assert load_config(tiny_project).segmentation.nucleus_diameter_um == "auto"


def test_malformed_yaml(tiny_project):
    tiny_project.write_text("samples: [unclosed\n")
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, str(tiny_project), "malformed YAML")


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError) as e:
        load_config(tmp_path / "nope.yaml")
    assert_one_line(e, "nope.yaml", "not found")


def test_missing_image(tiny_project):
    sheet = tiny_project.parent / "samples.tsv"
    sheet.write_text("sample_id\timage\ns1\tmissing.ome.tif\n")
    with pytest.raises(InputError) as e:
        load_config(tiny_project, check_images=True)
    assert_one_line(e, "missing.ome.tif", "not found")


def test_band_count_mismatch(tmp_path):
    from conftest import write_project

    path = write_project(tmp_path / "p", n_image_bands=7)
    with pytest.raises(InputError) as e:
        load_config(path, check_images=True)
    assert_one_line(e, "s1.ome.tif", "7 bands", "8 rows")


def test_corrupt_tiff(tiny_project):
    (tiny_project.parent / "s1.ome.tif").write_bytes(b"II*\x00garbage" * 10)
    with pytest.raises(InputError) as e:
        load_config(tiny_project, check_images=True)
    assert_one_line(e, "s1.ome.tif", "not a readable TIFF")


def test_duplicate_sample_ids(tiny_project):
    sheet = tiny_project.parent / "samples.tsv"
    image = tiny_project.parent / "s1.ome.tif"
    sheet.write_text(f"sample_id\timage\ns1\t{image}\ns1\t{image}\n")
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "samples.tsv", "row 3", "duplicate sample_id 's1'")


def test_bad_sample_id_and_control_score(tiny_project):
    sheet = tiny_project.parent / "samples.tsv"
    sheet.write_text("sample_id\timage\ns 1\tx.tif\n")
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "row 2", "sample_id 's 1'")
    sheet.write_text("sample_id\timage\tcontrol_score\ns1\tx.tif\t4+\n")
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "control_score '4+'")


def test_unknown_endmember_in_panel(tiny_project):
    panel = tiny_project.parent / "panel.tsv"
    panel.write_text(panel.read_text().replace("QD565\tER", "QD566\tER"))
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "panel.tsv", "row 3", "endmember 'QD566'")


def test_panel_rules(tiny_project):
    panel = tiny_project.parent / "panel.tsv"
    original = panel.read_text()
    cases = {
        original.replace("nuclear_stain", "autofluorescence"): "exactly one nuclear_stain",
        original.replace("hscore\t30\t80\t160", "hscore\t30\t\t"): "needs t1, t2 and t3",
        original.replace("hscore\t30\t80\t160", "hscore\t90\t80\t160"): "must rise",
        original.replace("\tmembrane\ther2", "\tmembrane\tbest"): "score 'best'",
        original.replace("QD565\tER", "QD565\tHER2"): "listed more than once",
    }
    for text, fragment in cases.items():
        panel.write_text(text)
        with pytest.raises(InputError) as e:
            load_config(tiny_project)
        assert_one_line(e, "panel.tsv", fragment)


def test_her2_marker_must_be_in_panel(tiny_project):
    edit_yaml(tiny_project, her2={"marker": "HER3"})
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "her2.marker", "HER3")


def test_spectra_errors(tiny_project):
    spectra = tiny_project.parent / "spectra.csv"
    original = spectra.read_text()
    lines = original.splitlines()
    cases = {
        "\n".join([lines[0], lines[1].replace(lines[1].split(",")[2], "nan"), *lines[2:]]): "not a finite number",
        original.replace("wavelength_nm", "lambda"): "first column must be 'wavelength_nm'",
        "\n".join(lines[:3]): "4 endmembers but only 2 bands",
    }
    for text, fragment in cases.items():
        spectra.write_text(text + "\n")
        with pytest.raises(InputError) as e:
            load_config(tiny_project)
        assert_one_line(e, "spectra.csv", fragment)


def test_explicit_thresholds_are_recorded(tiny_project):
    edit_yaml(tiny_project, her2={"marker": "HER2", "t_faint": 25})
    cfg = load_config(tiny_project)
    assert cfg.her2.thresholds_explicit and cfg.her2.t_faint == 25


@pytest.mark.parametrize(
    "section, fragment",
    [
        ({"tumour": {"marker": "ECAD"}}, "tumour.marker"),
        ({"tumour": {"marker": "HER2", "threshold": -1}}, "tumour.threshold"),
        ({"subtype": {"er": "ER", "pr": "HER2"}}, "subtype.pr"),
        ({"subtype": {"er": "ER", "pr": "ER", "pr_cutoff_pct": 120}}, "subtype.pr_cutoff_pct"),
        ({"subtype": {"er": "ER", "pr": "ER", "ki67": "Ki67"}}, "subtype.ki67"),
    ],
)
def test_clinical_sections(tiny_project, section, fragment):
    edit_yaml(tiny_project, **section)
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, fragment)


def test_illumination_values(tiny_project):
    edit_yaml(tiny_project, illumination="estimate")
    assert load_config(tiny_project).illumination == "estimate"
    edit_yaml(tiny_project, illumination="flatfield")
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "illumination")


def test_autofluorescence_from_the_slide_by_default_or_the_library(tiny_project):
    assert load_config(tiny_project).unmixing.autofluorescence == "slide"
    edit_yaml(tiny_project, unmixing={"autofluorescence": "library"})
    assert load_config(tiny_project).unmixing.autofluorescence == "library"
    edit_yaml(tiny_project, unmixing={"autofluorescence": "guess"})
    with pytest.raises(InputError) as e:
        load_config(tiny_project)
    assert_one_line(e, "unmixing.autofluorescence")


def test_a_results_folder_that_cannot_be_written_is_a_start_up_error(tiny_project):
    from qdquant.config import check_results_writable

    blocker = tiny_project.parent / "a_file"
    blocker.write_text("not a folder")
    edit_yaml(tiny_project, results=str(blocker / "results"))
    with pytest.raises(InputError) as e:
        check_results_writable(load_config(tiny_project))
    assert_one_line(e, "key 'results': cannot write to", "a_file/results")
