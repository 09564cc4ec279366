# Start-up checks: qdquant's schema and table checks (one-line errors naming
# the file, row or key; image headers included), then Snakemake's own schema
# validation, which also fills the defaults into `config`.
import functools
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

from qdquant import provenance, resources
from qdquant.config import SCHEMA_PATH, check_results_writable, load_config
from qdquant.errors import InputError


def is_test_slide(path):
    """A bundled test slide, which rule simulate_test_slide makes when it is missing."""
    return Path(path).parent == Path("test_data/slides") and Path(path).name.endswith(".ome.tif")


def config_files():
    """The config files in Snakemake's merge order: the Snakefile's, then --configfile's (deduplicated)."""
    cli = [str(p) for p in workflow.overwrite_configfiles]
    ordered = [str(p) for p in workflow.configfiles if str(p) not in cli] + cli
    seen, files = set(), []
    for path in ordered:
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            files.append(path)
    return files or ["config/config.yaml"]


def config_overrides_file():
    """`snakemake --config KEY=VALUE` overrides as a config file of their own (None without any),
    which every step merges last, as Snakemake does: the steps read config files, not
    Snakemake's config in memory. Named by its content, under .snakemake/qdquant/."""
    import hashlib

    import yaml

    overrides = json.loads(json.dumps(dict(workflow.config_settings.config or {}), default=str))
    if not overrides:
        return None
    text = yaml.safe_dump(overrides, sort_keys=True)
    path = Path(".snakemake", "qdquant", f"config-overrides-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return str(path)


CONFIG_FILES = config_files() + [p for p in (config_overrides_file(),) if p is not None]
try:
    CFG = load_config(config, source=" + ".join(CONFIG_FILES), check_images=True, image_will_exist=is_test_slide)
    check_results_writable(CFG)
except InputError as exc:
    sys.exit(f"qdquant: error: {exc}")
validate(config, str(SCHEMA_PATH))

# Rules run `qdquant ...`: put the environment that runs Snakemake first on
# PATH, so a venv's qdquant is found without activating the venv.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

RESULTS = str(CFG.results)
SAMPLES = [s.sample_id for s in CFG.samples]
CONTROLS = [s.sample_id for s in CFG.controls]
IMAGES = {s.sample_id: str(s.image) for s in CFG.samples}
# unmix inputs per sample: the image, and its unstained control where the sheet names one
UNMIX_IMAGES = {s.sample_id: [str(p) for p in (s.image, s.unstained) if p is not None] for s in CFG.samples}

# A sample's unmixed.ome.zarr is written by two steps, and each declares the files it writes
# there (Snakemake allows no step's output inside another step's directory() output): unmix
# the multiscale image and labels/flagged, segment the labels group (labels/.zgroup, and
# labels/.zattrs listing every label image) with labels/nuclei and labels/cells. The image's
# coarser levels (s1, s2, ...) are written with its level 0 and named in its .zattrs; they are
# not declared, as their number follows the slide's size and a rule declares the same files
# for every sample.
STORE = f"{RESULTS}/{{sample}}/unmixed.ome.zarr"
#: The multiscale image of the store: its metadata and its level-0 array (a folder, named
#: s0 by ome-zarr's writer; tests/workflow/test_workflow.py checks it against the store's .zattrs).
STORE_IMAGE = {"zgroup": f"{STORE}/.zgroup", "zattrs": f"{STORE}/.zattrs", "level0": f"{STORE}/s0"}


def step_outputs(*names):
    """Every output of these per-sample rules, as patterns with {sample}."""
    return [str(path) for name in names for path in getattr(rules, name).output]


def unmix_qc_files():
    """The QC files the unmix step writes beside qc/unmixing.png for this config
    (qdquant.pipeline.unmix_sample): the fit's statistics and the dark offset always, the
    library refinement unless it is off, the shading estimate when it is on."""
    names = ["unmixing.json", "dark_offset.csv"]
    if CFG.unmixing.refine_library is not False:
        names += ["library_refinement.csv", "library_refinement.png"]
    if CFG.illumination == "estimate":
        names += ["illumination.png", "illumination.json"]
    return [f"{RESULTS}/{{sample}}/qc/{name}" for name in names]


#: The settings each step's output depends on (dotted config keys, resolved with their
#: defaults): they are the step's `params`, so changing one reruns that step and the steps
#: after it, and no step before it.
STEP_SETTINGS = {
    "unmix": ("pixel_size_um", "chunk_size", "unmixing", "illumination"),
    "segment": ("chunk_size", "segmentation.nucleus_diameter_um", "segmentation.cell_expansion_um"),
    "quantify": ("chunk_size", "segmentation.membrane_width_px", "her2.marker", "her2.sectors"),
    "calibrate": ("her2",),
    "score": ("her2", "tumour", "subtype"),
    "report": ("her2", "tumour", "subtype"),
    "cohort": ("her2", "tumour", "subtype"),
}


def settings(name):
    """The step's settings as one JSON string (its `params`; see STEP_SETTINGS)."""
    values = {}
    for key in STEP_SETTINGS[name]:
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[key] = node
    return json.dumps(values, sort_keys=True, default=str)


def sample_settings(wildcards):
    """What the sample sheet says of a sample beyond its image (pixel size, control, score)."""
    sample = CFG.sample(wildcards.sample)
    return json.dumps({k: str(v) for k, v in vars(sample).items() if k != "image"}, sort_keys=True)


def shell_arg(text):
    """A user's value (a path) as one shell word: quoted against spaces and shell characters,
    and its braces doubled, since Snakemake formats the command (wildcards, {threads}) after."""
    return shlex.quote(str(text)).replace("{", "{{").replace("}", "}}")


def step(name, sample=True):
    """The rule's command: the same one a user runs by hand (config files merged in order, as here).

    Paths from the user are quoted (shell_arg); sample ids need no quoting, as the sample
    sheet allows only letters, digits, '-' and '_' in them (qdquant.config), and threads and
    memory are numbers."""
    configs = " ".join(f"--config {shell_arg(path)}" for path in CONFIG_FILES)
    per_sample = " --sample {wildcards.sample} --threads {threads} --mem-mb {resources.mem_mb}"
    return f"qdquant {shell_arg(name)} {configs}" + (per_sample if sample else "")


@functools.cache
def megapixels(sample):
    """The sample's slide size from its header (a chunk's worth while a test slide is not made yet)."""
    return resources.slide_megapixels(IMAGES[sample], default=CFG.chunk_size**2 / 1e6)


def step_mem_mb(step):
    """The rule's mem_mb: chunks in flight, threads and the slide's size (qdquant.resources); more on
    each retry. A step given less --mem-mb shrinks its chunks (qdquant.config.chunk_size_for)."""
    return lambda wildcards, threads, attempt: resources.step_mem_mb(
        step, megapixels(wildcards.sample), chunk_size=CFG.chunk_size, n_bands=len(CFG.library.wavelengths_nm),
        threads=threads, attempt=attempt)


def step_runtime(step):
    """The rule's runtime (minutes), from the slide's size and the rule's threads (qdquant.resources)."""
    return lambda wildcards, threads, attempt: resources.step_runtime_min(
        step, megapixels(wildcards.sample), n_bands=len(CFG.library.wavelengths_nm), threads=threads,
        attempt=attempt)


def step_errors(snakemake_logs):
    """For each failed job named in Snakemake's log ("Error in rule ...", then "log: ..."), the
    one line of its step log that says why: the first `qdquant: error:` line, or else the last
    line (a traceback's exception). Snakemake itself prints only "Error in rule unmix"."""
    if isinstance(snakemake_logs, (str, os.PathLike)):
        snakemake_logs = [snakemake_logs]
    step_logs, in_error = [], False
    for path in snakemake_logs or []:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            text = line.strip()
            if text.startswith("Error in rule "):
                in_error = True
            elif in_error and text.startswith("log: "):
                names = text[len("log: "):].split(" (check log file")[0]
                step_logs += [n.strip() for n in names.split(", ") if n.strip() not in step_logs]
                in_error = False
    found = []
    for log in step_logs:
        try:
            lines = [l.strip() for l in Path(log).read_text(errors="replace").splitlines() if l.strip()]
        except OSError:
            continue
        errors = [l for l in lines if l.startswith("qdquant: error:")]
        if errors or lines:
            found.append(f"{log}: {(errors or lines)[-1 if not errors else 0]}")
    return found
