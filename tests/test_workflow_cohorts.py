"""Cohorts the demo never meets, run as a user runs them: the README's command literally
(`.venv/bin/snakemake`, the venv not activated: its bin is not on PATH), no labels, a slide that is not
a slide, a slide that is missing, and command-line overrides."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml
import zarr
from helpers_workflow import tiny_stages

from dirl import store

ROOT = Path(__file__).resolve().parents[1]
# what a user's shell has without `source .venv/bin/activate`: no `python` with openslide on PATH
BARE_PATH = "/usr/bin:/bin"
TINY = tiny_stages()


def run_as_user(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`.venv/bin/snakemake --cores 2 --configfile config.yaml ...` from a shell without the venv."""
    snakemake = Path(sys.executable).parent / "snakemake"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=BARE_PATH, OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(snakemake), "-s", str(ROOT / "Snakefile"), "--cores", "2", "--configfile", "config.yaml", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def cohort(tmp_path: Path, sheet: str, **config) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "samples.tsv").write_text(sheet)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"cohort": "c", "samples": "samples.tsv", **TINY, **config}))
    return tmp_path


@pytest.mark.slow
def test_unlabelled_cohort_with_a_broken_and_a_missing_slide(tmp_path, cmu_slide):
    """No labels: every stage up to features runs, MIL is left out with a notice. With
    allow_failed_slides and --keep-going, the unreadable and the missing slide are listed in
    failed_slides.txt, skipped by every later stage, and the good slide goes all the way."""
    broken = tmp_path / "broken.svs"
    broken.write_text("not a slide\n" * 80)
    work = cohort(
        tmp_path,
        f"slide_id\tpath\ncmu\t{cmu_slide}\nbroken\t{broken}\ngone\t{tmp_path}/gone.svs\n",
        allow_failed_slides=True,
        qupath_export=True,
    )
    proc = run_as_user(work, "--keep-going")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "no slide has a label: MIL and the summary are left out" in out
    res = work / "results" / "c"
    failed = dict(line.split("\t") for line in (res / "failed_slides.txt").read_text().splitlines())
    assert sorted(failed) == ["broken", "gone"]
    assert "not a slide OpenSlide can read" in failed["broken"] and "file not found" in failed["gone"]
    good = store.open_tiles(res / "tiles" / "cmu.zarr")
    assert len(good) > 20 and not good.failed
    for method in ("dirl", "dino"):
        with h5py.File(res / "features" / method / "cmu.h5") as h:
            assert h["features"].shape[0] == len(good)
        with h5py.File(res / "features" / method / "gone.h5") as h:
            assert h["features"].shape[0] == 0
    assert (res / "pretrain" / "dirl" / "backbone.pt").exists()
    assert not (res / "mil").exists() and not (res / "summary.tsv").exists()

    # QuPath export: the good slide's tiles and nuclei; the failed ones, empty but valid
    def kinds(path: Path) -> list[str]:
        opened = gzip.open(path, "rt") if path.suffix == ".gz" else path.open()
        with opened as f:
            return [feature["properties"]["objectType"] for feature in json.load(f)["features"]]

    assert kinds(res / "export" / "cmu.geojson").count("tile") == len(good)
    nuclei = kinds(res / "export" / "cmu.nuclei.geojson.gz")
    assert nuclei.count("detection") == len(nuclei) == store.nucleus_count(res / "cells" / "cmu.zarr") > 0
    assert kinds(res / "export" / "gone.geojson") == kinds(res / "export" / "gone.nuclei.geojson.gz") == []


@pytest.mark.slow
def test_missing_slide_fails_only_its_own_job(tmp_path, cmu_slide):
    """Without allow_failed_slides the missing slide's tile job fails (naming the slide) and, with
    --keep-going, the other slide's per-slide stages still run; cohort stages wait."""
    work = cohort(tmp_path, f"slide_id\tpath\ncmu\t{cmu_slide}\ngone\t/nowhere/gone.svs\n")
    proc = run_as_user(work, "--keep-going", "--until", "segment")
    assert proc.returncode != 0
    log = (work / "logs" / "c" / "tile" / "gone.log").read_text()
    assert "slide 'gone': file not found: /nowhere/gone.svs" in log
    assert (work / "results" / "c" / "cells" / "cmu.zarr").is_dir()


def dry_run(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_as_user(work, "-n", *args)


@pytest.mark.slow
def test_failed_slides_are_listed_by_every_cohort_stage_and_the_setting_retiles_nothing(tmp_path, cmu_slide):
    """`--until priors` used to leave failed_slides.txt unwritten (a skipped slide was listed nowhere), and
    toggling allow_failed_slides re-tiled every good slide (it was a param of the tile jobs). Now the
    list comes with the first cohort stage, and the setting, which says what a failure becomes when it
    happens, reruns nothing."""
    broken = tmp_path / "broken.svs"
    broken.write_text("not a slide\n" * 80)
    work = cohort(tmp_path, f"slide_id\tpath\ncmu\t{cmu_slide}\nbroken\t{broken}\n", allow_failed_slides=True)
    proc = run_as_user(work, "--until", "priors")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = work / "results" / "c"
    assert (res / "failed_slides.txt").read_text().startswith("broken\t")
    assert (res / "priors" / "cmu.zarr").is_dir()
    plan = dry_run(work, "--until", "priors", "--config", "allow_failed_slides=false")
    out = plan.stdout + plan.stderr
    assert plan.returncode == 0 and "total        0" in out and "rule " not in out, out[-3000:]


def test_command_line_overrides_are_typed_by_the_schema(tmp_path):
    """`--config` hands values over as strings; they work like the same values in the file."""
    work = cohort(tmp_path, "slide_id\tpath\ns1\t/x/s1.svs\n")
    proc = dry_run(
        work,
        "--config",
        "allow_failed_slides=true",
        "tiling={mpp: 1.0, tile_px: 64.0}",
        "pretrain={epochs: '3', lr: 1e-3}",
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = proc.stdout + proc.stderr
    assert "--on-error empty" in out and '"tile_px": 64,' in out


@pytest.mark.parametrize(
    "config, message",
    [
        ({"mil": {"folds": 1}}, "mil.folds"),
        (
            {"pretrain": {"arch": "vit_tiny_patch16_224", "img_size": 100}},
            "pretrain.img_size = 100 is not a multiple of the patch size 16 of vit_tiny_patch16_224",
        ),
        ({"tiling": {"mpp": float("nan")}}, "config tiling.mpp = nan: must be a finite number"),
        (
            {"segmentation": {"backend": "unet", "weights": "/nowhere/w.npz"}},
            "segmentation.weights '/nowhere/w.npz': no such file",
        ),
        (
            {"segmentation": {"backend": "unet", "weights": "samples.tsv"}},
            "segmentation.weights 'samples.tsv': not U-Net weights written by dirl",
        ),
    ],
)
def test_bad_settings_are_refused_at_start_up(tmp_path, config, message):
    work = cohort(tmp_path, "slide_id\tpath\tlabel\ns1\t/x/s1.svs\tA\ns2\t/x/s2.svs\tB\n", **config)
    proc = dry_run(work)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-3000:]
    assert "Traceback" not in out


def test_labels_are_checked_only_when_mil_runs(tmp_path):
    sheet = "slide_id\tpath\tlabel\ns1\t/x/s1.svs\tA\ns2\t/x/s2.svs\tA\n"  # one class: no MIL possible
    proc = dry_run(cohort(tmp_path, sheet))
    assert proc.returncode != 0 and "only one label ('A')" in proc.stdout + proc.stderr
    proc = dry_run(cohort(tmp_path, sheet, mil={"models": []}))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "mil.models is empty" in out and "rule mil" not in out, out[-3000:]


@pytest.mark.slow
def test_imported_nuclei_feed_segmentation_and_priors(tmp_path, cmu_slide):
    """segmentation.backend import: the sample sheet's `nuclei` column feeds each slide's segment job
    (run as a user would, up to the priors); a sheet without the column is refused at start-up."""
    from dirl.cli import main as cli

    lab = tmp_path / "lab"  # the lab's own nuclei: here dirl's, exported from a separate run on the slide
    tiling = ["--mpp", str(TINY["tiling"]["mpp"]), "--tile-px", str(TINY["tiling"]["tile_px"])]
    assert cli(["tile", str(cmu_slide), str(lab / "t.zarr"), *tiling]) == 0
    assert cli(["segment", str(lab / "t.zarr"), str(lab / "c.zarr")]) == 0
    assert cli(["export", str(lab / "t.zarr"), "--cells", str(lab / "c.zarr"), "--out", str(lab / "cmu.geojson")]) == 0
    seg, pheno = {"backend": "import", "threads": 1}, {**TINY["phenotypes"], "source": "imported"}
    sheet = f"slide_id\tpath\tnuclei\ncmu\t{cmu_slide}\t{lab / 'cmu.geojson'}\n"
    work = cohort(tmp_path / "run", sheet, segmentation=seg, phenotypes=pheno)
    proc = run_as_user(work, "--until", "priors")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    cells = work / "results" / "c" / "cells" / "cmu.zarr"
    attrs = store.map_attrs(cells, "labels")
    assert attrs["backend"] == "import" and attrs["type_names"] == ["nucleus"]
    assert store.nucleus_count(cells) == store.nucleus_count(lab / "c.zarr") > 100
    priors = store.map_attrs(work / "results" / "c" / "priors" / "cmu.zarr", "priors")
    assert priors["class_names"] == ["glass", "tissue", "class 0: nucleus"]  # the imported type is the class
    bad = cohort(tmp_path / "bad", f"slide_id\tpath\ncmu\t{cmu_slide}\n", segmentation=seg)
    proc = dry_run(bad)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "names none for ['cmu']" in out and "Traceback" not in out
    proc = dry_run(cohort(tmp_path / "bad2", sheet, phenotypes=pheno))  # imported classes, watershed nuclei
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "set segmentation.backend: import" in out and "Traceback" not in out


@pytest.mark.slow
def test_a_cohort_segmented_by_the_unet_backend(tmp_path, cmu_slide):
    """`segmentation.backend: unet` as a user runs it: the shipped weights are an input of each segment job,
    the cells store names them, and the nuclei feed the classes and the priors."""
    work = cohort(tmp_path, f"slide_id\tpath\ncmu\t{cmu_slide}\n", segmentation={"backend": "unet"})
    proc = run_as_user(work, "--until", "priors")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = work / "results" / "c"
    attrs = zarr.open_group(str(res / "cells" / "cmu.zarr"), mode="r").attrs
    assert attrs["backend"] == "unet" and attrs["model"] == "unet-centres:unet_crc.npz", dict(attrs)
    assert store.nucleus_count(res / "cells" / "cmu.zarr") > 100
    assert (res / "priors" / "cmu.zarr").is_dir()
