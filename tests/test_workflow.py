"""End to end: the real `snakemake` command through every rule on a small synthetic cohort.

One module-scoped run (a few minutes on 2 CPU cores), then checks on what users rely on: the data
contracts, a second run doing nothing, a changed MIL setting rerunning only MIL and what follows, and
clear start-up errors for a bad sample sheet.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers_workflow import tiny_stages

from dirl import store

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT.parent / "shared" / "tools" / "contract.py"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

CONFIG = {
    "cohort": "e2e",
    "samples": "samples.tsv",
    "synth": {
        "a1": {"populations": ["lymphocyte"], "width": 1024, "height": 1024, "seed": 1, "tissue": "full"},
        "a2": {"populations": ["lymphocyte"], "width": 1024, "height": 1024, "seed": 2, "tissue": "full"},
        "b1": {"populations": ["tumour"], "width": 1024, "height": 1024, "seed": 3, "tissue": "full"},
        "b2": {"populations": ["tumour"], "width": 1024, "height": 1024, "seed": 4, "tissue": "full"},
    },
    **tiny_stages(batch_size=32, tiles_per_slide=32),
    "mil": {"models": ["meanpool", "abmil"], "folds": 2, "epochs": 3, "final": True},
    "qupath_export": True,
    # labelled tissue for the probe: crops of the two populations, and the same crops with shuffled labels
    "probe": {
        "datasets": {
            "pops": {"manifest": "probe/pops.tsv", "mpp": 1.0},
            "shuffled": {"manifest": "probe/shuffled.tsv", "mpp": 1.0},
        },
        "bootstrap": 200,
    },
}
SAMPLES = (
    "slide_id\tpath\tpatient_id\tlabel\n"
    "a1\tresources/synth/a1.svs\tpa1\tA\n"
    "a2\tresources/synth/a2.svs\tpa2\tA\n"
    "b1\tresources/synth/b1.svs\tpb1\tB\n"
    "b2\tresources/synth/b2.svs\tpb2\tB\n"
)


def snakemake_command(workdir: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        *SNAKEMAKE,
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "2",
        *args,
    ]
    return cmd, env


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd, env = snakemake_command(workdir, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def write_cohort(workdir: Path, config: dict, samples: str = SAMPLES) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    (workdir / "samples.tsv").write_text(samples)
    if config.get("probe", {}).get("datasets"):
        write_probe_images(workdir / "probe")


def write_probe_images(d: Path) -> None:
    """Eight 128 px images (1 µm/px) per population, each its own group, two manifests: the populations,
    and the same images with labels shuffled across groups (each label still on four groups)."""
    from PIL import Image

    from dirl import synth

    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for pop in ("lymphocyte", "tumour"):
        for k in range(8):
            rgb, _, _ = synth.render(
                0, 0, 128, 128, mpp=1.0, populations=(synth.POPULATIONS[pop],), seed=100 + k, tissue="full"
            )
            Image.fromarray(rgb).save(d / f"{pop}{k}.png")
            rows.append((f"{pop}{k}.png", pop))
    (d / "pops.tsv").write_text("path\tlabel\tgroup\n" + "".join(f"{p}\t{lab}\t{p}\n" for p, lab in rows))
    shuffled = ["lymphocyte", "tumour"] * 8  # alternating over the images: independent of the population
    (d / "shuffled.tsv").write_text(
        "path\tlabel\tgroup\n" + "".join(f"{p}\t{lab}\t{p}\n" for (p, _), lab in zip(rows, shuffled))
    )


@dataclass
class Cohort:
    workdir: Path
    second_run: subprocess.CompletedProcess[str]  # started while the first one was running


@pytest.fixture(scope="module")
def cohort_runs(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """The full run, and a second `snakemake` on the same directory started while it works."""
    workdir = tmp_path_factory.mktemp("workflow")
    write_cohort(workdir, CONFIG)
    cmd, env = snakemake_command(workdir)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as first:
        locks = workdir / ".snakemake" / "locks"
        while first.poll() is None and not (locks.is_dir() and any(locks.iterdir())):
            time.sleep(0.2)
        second = snakemake(workdir, check=False)
        out, _ = first.communicate(timeout=1800)
    assert first.returncode == 0, out[-6000:]
    return Cohort(workdir, second)


@pytest.fixture(scope="module")
def cohort(cohort_runs: Cohort) -> Path:
    return cohort_runs.workdir


@pytest.mark.slow
def test_every_stage_output_meets_the_contracts(cohort: Path) -> None:
    res = cohort / "results" / "e2e"
    for sid in ("a1", "a2", "b1", "b2"):
        t = store.open_tiles(res / "tiles" / f"{sid}.zarr")
        assert len(t) == 64  # 1024 px of tissue at 0.5 µm/px = 512 µm; 64 px tiles at 1 µm/px: 8 x 8
        priors = store.open_map(res / "priors" / f"{sid}.zarr", "priors", len(t))
        rows = store.tile_subset(len(t), 32, sid)  # pretrain.tiles_per_slide: only those are segmented
        assert store.map_attrs(res / "priors" / f"{sid}.zarr", "priors")["rows"] == rows.tolist()
        values = np.unique(store.read_rows(priors, rows[:8]))
        assert {1}.issubset(values) and values.max() >= 2  # tissue and at least one cell class
        assert (res / "features" / "dirl" / f"{sid}.h5").exists()
        feats = json.loads((res / "export" / f"{sid}.geojson").read_text())["features"]
        nuclei = json.loads(gzip.decompress((res / "export" / f"{sid}.nuclei.geojson.gz").read_bytes()))["features"]
        assert len(nuclei) == store.nucleus_count(res / "cells" / f"{sid}.zarr") > 0
        assert all(f["properties"]["classification"]["name"].startswith("class ") for f in nuclei)
        tiles = [f["properties"]["measurements"] for f in feats if f["properties"]["objectType"] == "tile"]
        assert len(tiles) == 64 and [f["properties"]["objectType"] for f in feats].count("annotation") == 1
        assert all(np.isfinite(t["MIL dirl/abmil attention"]) and "MIL dino/abmil attention" in t for t in tiles)
        sampled = [t for t in tiles if "Attention entropy dirl" in t]  # the tiles the diagnostics looked at
        assert all(0 < t["Attention entropy dino"] <= 1 and "Attention entropy untrained" in t for t in sampled)
    att = json.loads((res / "analysis" / "attention.json").read_text())
    exported = sum(
        "Attention entropy dirl" in f["properties"].get("measurements", {})
        for sid in ("a1", "a2", "b1", "b2")
        for f in json.loads((res / "export" / f"{sid}.geojson").read_text())["features"]
    )
    assert exported == len(att["tiles"]) > 0
    for method in ("dirl", "dino"):
        log = [json.loads(line) for line in (res / "pretrain" / method / "log.jsonl").read_text().splitlines()]
        assert log and all(np.isfinite(r["loss"]) for r in log)
        assert (log[-1]["loss_dense"] > 0) == (method == "dirl")
    metrics = json.loads((res / "mil" / "dirl" / "abmil" / "metrics.json").read_text())
    assert "auc" in json.dumps(metrics)
    summary = (res / "summary.tsv").read_text()
    assert "dirl-dino" in summary and "head_entropy" in summary
    att = json.loads((res / "analysis" / "attention.json").read_text())
    assert set(att["runs"]) == {"untrained", "dirl", "dino"}
    assert "What the encoders are worth: probe `pops`" in (res / "summary.md").read_text()
    assert (res / "failed_slides.txt").read_text() == ""
    if CONTRACT.exists():
        proc = subprocess.run([sys.executable, str(CONTRACT), str(res)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    assert (cohort / "logs" / "e2e" / "tile" / "a1.log").read_text()


@pytest.mark.slow
def test_concurrent_run_on_the_same_directory_is_refused(cohort_runs: Cohort) -> None:
    """Snakemake's lock: the second run stops at once and writes nothing; the first completes."""
    out = cohort_runs.second_run.stdout + cohort_runs.second_run.stderr
    assert cohort_runs.second_run.returncode != 0 and "cannot be locked" in out, out[-3000:]


@pytest.mark.slow
def test_second_run_does_nothing(cohort: Path) -> None:
    assert planned_jobs(snakemake(cohort, "-n")) == {}


def dry_run_with(cohort: Path, section: str, key: str, value: object) -> dict[str, int]:
    """Jobs a dry run plans after one config edit (the config is restored afterwards)."""
    config = json.loads(json.dumps(CONFIG))
    config[section][key] = value
    (cohort / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        return planned_jobs(snakemake(cohort, "-n"))
    finally:
        (cohort / "config.yaml").write_text(yaml.safe_dump(CONFIG))


@pytest.mark.slow
def test_changed_mil_setting_reruns_only_mil(cohort: Path) -> None:
    jobs = dry_run_with(cohort, "mil", "epochs", 4)
    assert set(jobs) == {"mil", "summary", "export", "all"}, jobs  # the QuPath files show MIL attention
    assert jobs["mil"] == 4 and jobs["export"] == 4  # 2 sources x 2 models; 4 slides


@pytest.mark.slow
def test_changed_tiling_reruns_everything_downstream(cohort: Path) -> None:
    jobs = dry_run_with(cohort, "tiling", "min_tissue", 0.6)
    assert jobs["tile"] == 4 and jobs["segment"] == 4 and jobs["pretrain"] == 2 and "synth" not in jobs


def test_bad_sample_sheet_is_refused_at_start(tmp_path: Path) -> None:
    write_cohort(tmp_path, CONFIG, SAMPLES + "a1\tresources/synth/a1.svs\tpa1\tA\n")
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "slide_id 'a1' (line 2) and 'a1' (line 6)" in proc.stdout + proc.stderr
    write_cohort(tmp_path, CONFIG, SAMPLES.replace("a2\t", "a 2\t"))
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "line 3" in proc.stdout + proc.stderr


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    write_cohort(tmp_path, {**CONFIG, "tiling": {"tile_size": 64}})
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "tile_size" in proc.stdout + proc.stderr


def test_slurm_profile_and_templates_dry_run(tmp_path: Path) -> None:
    """The SLURM profile parses and the cohort templates plan a full run (dry run: no cluster)."""
    for template in sorted((ROOT / "config" / "cohorts").glob("*.yaml")):
        config = yaml.safe_load(template.read_text())
        config["samples"] = "samples.tsv"
        config["synth"] = CONFIG["synth"]
        config["mil"]["folds"] = 2  # four test slides, two patients per class
        config.setdefault("attention", {})["slides"] = []  # the template's slides are not these
        config.pop("probe", None)  # its labelled data is the template's
        config["pretrain"].pop("init", None)  # so is the run it continues
        write_cohort(tmp_path, config)
        jobs = planned_jobs(snakemake(tmp_path, "-n"))
        runs = len(config["pretrain"]["methods"]) * len(config["pretrain"].get("seeds", [0]))
        assert jobs["tile"] == 4 and jobs["pretrain"] == runs
        assert jobs.get("mil", 0) >= 2 or config["mil"].get("models") == []
    shutil.copytree(ROOT / "profiles" / "slurm", tmp_path / "slurm")
    write_cohort(tmp_path, CONFIG)
    proc = snakemake(tmp_path, "-n", "--profile", str(tmp_path / "slurm"), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # pretraining on two nodes of four GPUs: one job of 2 nodes, a task each (srun: a torchrun agent per
    # node), GPUs per node as generic resources
    multi = {**CONFIG, "pretrain": {**CONFIG["pretrain"], "nodes": 2, "gpus": 4}}
    write_cohort(tmp_path, multi)
    site = tmp_path / "slurm" / "config.yaml"  # the site's GPU model, as a user sets it in the profile
    site.write_text(site.read_text().replace("gpu_model: null", "gpu_model: h100"))
    proc = snakemake(tmp_path, "-n", "-p", "--profile", str(tmp_path / "slurm"), "--until", "pretrain", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    job = out[out.index("rule pretrain:") :].split("\n\n")[0]
    for request in ("nodes=2", "tasks=2", "mpi=srun", "gres=gpu:h100:4", "tasks_per_gpu=0", "gpu=0"):
        assert request in job, job
    assert "dirl_nodes 2 4 pretrain" in out
    # the profile's `gpu_model: null` reaches the workflow as the text "None": never `--gpus=None:1`
    site.write_text(site.read_text().replace("gpu_model: h100", "gpu_model: null"))
    proc = snakemake(tmp_path, "-n", "-p", "--profile", str(tmp_path / "slurm"), "--until", "pretrain", check=False)
    out = proc.stdout + proc.stderr
    assert "gres=gpu:4," in out and "None" not in out[out.index("rule pretrain:") :].split("\n\n")[0]


def test_default_profile_applies_to_every_run(tmp_path: Path) -> None:
    """profiles/default sits where Snakemake looks for a workflow profile (beside the Snakefile): its
    settings (here printshellcmds) hold without any flag, with --profile slurm too."""
    write_cohort(tmp_path, CONFIG)
    proc = snakemake(tmp_path, "-n")
    assert "dirl tile" in proc.stdout + proc.stderr
    shutil.copytree(ROOT / "profiles" / "slurm", tmp_path / "slurm")
    proc = snakemake(tmp_path, "-n", "--profile", str(tmp_path / "slurm"))
    assert "dirl tile" in proc.stdout + proc.stderr


def test_jobs_run_the_package_next_to_the_snakefile(tmp_path: Path) -> None:
    """A copy of the workflow runs its own `dirl`, not the installed one: what lets `--sdm conda` jobs
    (whose environment does not install dirl) find it, and keeps workflow and library in step."""
    copy = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for part in ("workflow", "dirl", "envs"):
        shutil.copytree(ROOT / part, copy / part, ignore=ignore)
    shutil.copy(ROOT / "Snakefile", copy / "Snakefile")
    with open(copy / "dirl" / "__init__.py", "a") as f:  # each import of this copy leaves a mark
        f.write("\nimport os as _os\nopen(_os.environ['DIRL_IMPORT_MARK'], 'a').write(__file__ + '\\n')\n")
    work = tmp_path / "run"
    write_cohort(work, CONFIG)
    cmd, env = snakemake_command(work, "resources/synth/a1.svs")
    cmd[cmd.index("-s") + 1] = str(copy / "Snakefile")
    mark = tmp_path / "imports"
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "DIRL_IMPORT_MARK": str(mark)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "resources" / "synth" / "a1.svs").stat().st_size > 0
    # the workflow (start-up checks) and the job both import the copy, never the installed package
    assert set(mark.read_text().split()) == {str((copy / "dirl" / "__init__.py").resolve())}


def test_lint_is_clean() -> None:
    proc = subprocess.run(
        [*SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(ROOT), "--lint"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "Lints for" not in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_too_few_patients_for_the_folds_is_refused_at_start(tmp_path: Path) -> None:
    write_cohort(tmp_path, {**CONFIG, "mil": {"folds": 3}})
    proc = snakemake(tmp_path, "-n", check=False)
    assert proc.returncode != 0 and "fewer patients than mil.folds = 3" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_probe_compares_every_source_and_a_label_beats_shuffled_labels(cohort: Path) -> None:
    """`snakemake` ran the probe on both labelled sets: every source (both runs, the untrained backbone, colour
    statistics) has its JSON; what carries the label (the populations differ in colour and texture) scores
    far above the same images with shuffled labels, which stay near chance."""
    res = cohort / "results" / "e2e" / "probe"
    for dataset in ("pops", "shuffled"):
        summary = json.loads((res / dataset / "summary.json").read_text())
        assert set(summary["sources"]) == {"dirl", "dino", "untrained", "colour"}
        for source in summary["sources"]:
            one = json.loads((res / dataset / f"{source}.json").read_text())
            assert one["class_counts"]["test"] and one["protocols"]["knn"]["confusion"]
        assert set(summary["differences"]["knn"]) >= {"dirl − dino", "dirl − untrained", "dino − colour"}
        assert (res / dataset / "summary.png").stat().st_size > 1000
    real = json.loads((res / "pops" / "summary.json").read_text())["sources"]["colour"]
    fake = json.loads((res / "shuffled" / "summary.json").read_text())["sources"]["colour"]
    for proto in ("knn", "logreg"):
        # (16 test tiles of 4 images per label: k-NN on 30 colour statistics gets 3 of the 4 images right)
        assert (
            real[proto]["balanced_accuracy"] >= 0.7
            and real[proto]["balanced_accuracy"] > fake[proto]["balanced_accuracy"] + 0.25
        )


@pytest.mark.slow
def test_bundled_extraction_loads_each_encoder_once_and_writes_the_same_features(cohort: Path, tmp_path: Path) -> None:
    """`extract.slides_per_job: 3` on a copy of the finished cohort: 4 slides are 2 jobs per source (its
    log shows one encoder load for the bundle's slides), and every feature file equals the per-slide one."""
    work = tmp_path / "bundled"
    shutil.copytree(cohort, work, symlinks=True)
    config = json.loads(json.dumps(CONFIG))
    config["extract"]["slides_per_job"] = 3
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    targets = [f"results/e2e/features/{src}/{sid}.h5" for src in ("dirl", "dino") for sid in ("a1", "a2", "b1", "b2")]
    jobs = planned_jobs(snakemake(work, "-n", "--forcerun", *targets, "--until", *targets))
    assert jobs == {"extract_dirl_0": 1, "extract_dirl_1": 1, "extract_dino_0": 1, "extract_dino_1": 1}, jobs
    snakemake(work, "--forcerun", *targets, "--until", *targets)
    for src in ("dirl", "dino"):
        log = (work / "logs" / "e2e" / "extract" / src / "bundle-0.log").read_text()
        assert log.count(" encoder ") == 1 and all(f"{sid}: " in log for sid in ("a1", "a2", "b1"))
        for sid in ("a1", "a2", "b1", "b2"):
            one, coords, _ = store.read_features(cohort / "results" / "e2e" / "features" / src / f"{sid}.h5")
            bundled, bcoords, _ = store.read_features(work / "results" / "e2e" / "features" / src / f"{sid}.h5")
            np.testing.assert_array_equal(coords, bcoords)
            np.testing.assert_allclose(bundled, one, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_trained_cell_classes_from_typed_points_run_through_the_workflow(cohort: Path, tmp_path: Path) -> None:
    """`phenotypes.source: trained` on a copy of the finished cohort: every other segmented nucleus of each
    slide clicked as a QuPath typed point (its slide's population), the sample sheet's `cell_labels` naming
    the files; the workflow fits the CNN validated by slide and the priors class each slide's nuclei."""
    work = tmp_path / "trained"
    shutil.copytree(cohort, work, symlinks=True)
    results = work / "results" / "e2e"
    sheet = ["slide_id\tpath\tpatient_id\tlabel\tcell_labels"]
    for line in SAMPLES.splitlines()[1:]:
        sid = line.split("\t")[0]
        tab = store.read_nuclei(results / "cells" / f"{sid}.zarr", ["x", "y"])
        name = "lymphocyte" if sid.startswith("a") else "tumour"
        points = [[float(x), float(y)] for x, y in zip(tab["x"][::2], tab["y"][::2])]
        feature = {
            "type": "Feature",
            "geometry": {"type": "MultiPoint", "coordinates": points},
            "properties": {"objectType": "annotation", "classification": {"name": name}},
        }
        (work / f"{sid}.points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
        sheet.append(f"{line}\t{sid}.points.geojson")
    (work / "samples.tsv").write_text("\n".join(sheet) + "\n")
    config = json.loads(json.dumps(CONFIG))
    config["phenotypes"] = {**config.get("phenotypes", {}), "source": "trained", "min_examples": 10, "epochs": 5}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    targets = [f"results/e2e/priors/{sid}.zarr" for sid in ("a1", "a2", "b1", "b2")]
    snakemake(work, "--until", *targets)
    model = json.loads((results / "phenotypes" / "model.json").read_text())
    assert model["method"] == "trained" and model["classifier"]["kind"] == "cnn"
    assert [c["description"] for c in model["classes"]] == ["lymphocyte", "tumour"]
    assert model["validation"]["folds"] == 4 and model["validation"]["balanced_accuracy"] > 0.8, model["validation"]
    for sid, want in (("a1", 0), ("a2", 0), ("b1", 1), ("b2", 1)):
        cls, names = store.read_nucleus_classes(results / "priors" / f"{sid}.zarr")
        assert names == ["lymphocyte", "tumour"] and (cls == want).mean() > 0.8, (sid, np.bincount(cls))


# --------------------------------------------------------------------------------------------------
# external validation: the e2e cohort's models on a second cohort
def external_cohort(tmp_path: Path, trained: Path, cmu: Path, **deploy: object) -> Path:
    """Two synthetic slides of other seeds (labelled) and the real CMU slide (no label), `deploy.from` the
    trained cohort; tiling as the trained cohort's."""
    synth = {
        "a9": {**CONFIG["synth"]["a1"], "seed": 91},
        "b9": {**CONFIG["synth"]["b1"], "seed": 92},
    }
    config = {
        "cohort": "ext",
        "samples": "samples.tsv",
        "synth": synth,
        **{k: CONFIG[k] for k in ("tiling", "extract")},
        "deploy": {"from": str(trained / "results" / "e2e"), **deploy},
        "qupath_export": True,
    }
    sheet = (
        "slide_id\tpath\tpatient_id\tlabel\n"
        "a9\tresources/synth/a9.svs\tpa9\tA\nb9\tresources/synth/b9.svs\tpb9\tB\ncmu\t{cmu}\tcmu\t\n"
    )
    write_cohort(tmp_path, config, sheet.format(cmu=cmu))
    return tmp_path


@pytest.mark.slow
def test_deployment_applies_the_trained_models_to_another_cohort(cohort: Path, tmp_path: Path, cmu_slide) -> None:
    """The trained cohort's final models on new slides: tiled at its µm/px, encoded by its encoders (no
    segmentation, pretraining or cross-validation), every slide predicted, the real unlabelled one too;
    probabilities equal the final model applied by hand, AUC equals sklearn's on the written ones,
    `use: folds` is the mean of the fold models, `dirl predict` agrees, the QuPath export shows the
    deployed attention and the summary the external figures."""
    from sklearn.metrics import roc_auc_score

    from dirl.mil.deploy import apply, load_models

    trained = cohort / "results" / "e2e"
    work = external_cohort(tmp_path / "ext", cohort, cmu_slide, sources=["dirl"], models=["abmil"])
    proc = snakemake(work)
    jobs = planned_jobs(proc)
    assert {"deploy", "extract", "tile"} <= set(jobs) and not {"segment", "pretrain", "mil", "attention"} & set(jobs)
    res = work / "results" / "ext"
    d = res / "deploy" / "dirl" / "abmil"
    preds = list(csv.DictReader((d / "predictions.csv").open()))
    assert [r["slide_id"] for r in preds] == ["a9", "b9", "cmu"] and preds[2]["label"] == ""
    model = load_models(trained / "mil" / "dirl" / "abmil", "final")
    for r in preds:
        x, _, attrs = store.read_features(res / "features" / "dirl" / f"{r['slide_id']}.h5")
        trained_attrs = store.read_features(trained / "features" / "dirl" / "a1.h5")[2]
        assert attrs["encoder"] == trained_attrs["encoder"]  # the trained cohort's DiRL backbone
        p, a = apply(model, x)
        assert float(r["prob_A"]) == pytest.approx(float(p[0]), abs=1e-5)
        assert a is not None and len(a) == len(x)
    m = json.loads((d / "metrics.json").read_text())
    assert m["n_slides"] == 3 and m["n_labelled"] == 2 and m["use"] == "final"
    y = [int(r["label"] == "B") for r in preds[:2]]
    assert m["metrics"]["auc"] == pytest.approx(roc_auc_score(y, [float(r["prob_B"]) for r in preds[:2]]))
    assert set(m["intervals"]) == {"auc", "balanced_accuracy", "f1_macro"}
    assert "External validation" in (res / "summary.md").read_text()
    tiles = [
        f
        for f in json.loads((res / "export" / "cmu.geojson").read_text())["features"]
        if f["properties"]["objectType"] == "tile"
    ]
    assert tiles and all(np.isfinite(t["properties"]["measurements"]["MIL dirl/abmil attention"]) for t in tiles)
    assert not (res / "export" / "cmu.nuclei.geojson.gz").exists()
    # use: folds, the mean of the fold models' probabilities
    folds = tmp_path / "folds"
    cli = [sys.executable, "-m", "dirl.cli", "deploy", "--model", str(trained / "mil" / "dirl" / "abmil")]
    subprocess.run(
        [
            *cli,
            "--use",
            "folds",
            "--features",
            str(res / "features" / "dirl"),
            "--samples",
            str(work / "samples.tsv"),
            "--out",
            str(folds),
        ],
        check=True,
        capture_output=True,
    )
    per_fold = [load_models(trained / "mil" / "dirl" / "abmil", "folds")[i : i + 1] for i in range(2)]
    for r in csv.DictReader((folds / "predictions.csv").open()):
        x = store.read_features(res / "features" / "dirl" / f"{r['slide_id']}.h5")[0]
        mean = np.mean([apply(f, x)[0] for f in per_fold], axis=0)
        assert float(r["prob_B"]) == pytest.approx(float(mean[1]), abs=1e-5)
    # `dirl predict` on the real slide: the same tiles, features and probabilities
    out = tmp_path / "predict"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dirl.cli",
            "predict",
            str(cmu_slide),
            "--model",
            str(trained / "mil" / "dirl" / "abmil"),
            "--out",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    one = next(csv.DictReader((out / "predictions.csv").open()))
    assert float(one["prob_A"]) == pytest.approx(float(preds[2]["prob_A"]), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"tiling": {"mpp": 0.5, "tile_px": 64}},
            "was trained on 64 px tiles at 1 µm/px, this cohort's tiling is 64 px at 0.5",
        ),
        ({"label": "C"}, "labels ['C'] of the sample sheet are not among the trained classes ['A', 'B']"),
        ({"deploy": {"sources": ["nope"]}}, "has MIL models of ['dino', 'dirl'] only"),
        ({"deploy": {"models": ["transmil"]}}, "has no trained transmil"),
        ({"deploy": {"from": "results/none"}}, "no mil/ directory"),
    ],
)
def test_deployment_mismatches_are_refused_at_start_up(
    cohort: Path, tmp_path: Path, cmu_slide, change, message
) -> None:
    work = external_cohort(tmp_path, cohort, cmu_slide)
    config = yaml.safe_load((work / "config.yaml").read_text())
    if "label" in change:
        (work / "samples.tsv").write_text((work / "samples.tsv").read_text().replace("\tB\n", "\tC\n"))
    for key in ("tiling", "deploy"):
        config[key] = {**config[key], **change.get(key, {})}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(work, "-n", check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
