"""`dirl pretrain` end to end on tiny data: loss goes down, exact resume, DDP (torchrun/gloo) agrees
with one process, outputs loadable by timm, clear errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_toy import TINY_PRETRAIN, TINY_SETTINGS, write_toy_cohort

from dirl.cli import main as cli
from dirl.errors import DirlError
from dirl.ssl import schedules
from dirl.ssl.settings import PretrainSettings
from dirl.ssl.train import Run

TINY = list(TINY_PRETRAIN)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads waiting on a busy core make a
    tiny model several times slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    tiles, priors = write_toy_cohort(tmp_path_factory.mktemp("cohort"), n_slides=2, n_tiles=8, tile_px=64)
    return ["--tiles", *map(str, tiles), "--priors", *map(str, priors)]


def _losses(out: Path, key="loss"):
    return [json.loads(line)[key] for line in (out / "log.jsonl").read_text().splitlines()]


def _same_backbone(one: Path, two: Path) -> None:
    """The backbones of two runs agree to float32 summation order: gradients all-reduced over processes add
    up in another order than one process's, ~1e-5 after these steps (CPU-dependent), while one AdamW step
    moves a weight by ~lr = 1.6e-2, so a run that trained on other data or skipped a sync is far off."""
    a = torch.load(one / "backbone.pt", weights_only=True)
    b = torch.load(two / "backbone.pt", weights_only=True)
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point()}
    assert max(diff.values()) <= 1e-4, sorted(diff.items(), key=lambda kv: -kv[1])[:5]


def test_schedules():
    assert schedules.cosine(0, 10, 1.0, 0.0, 2, 0.0) == 0.0
    assert schedules.cosine(1, 10, 1.0, 0.0, 2, 0.0) == 0.5
    assert schedules.cosine(2, 10, 1.0, 0.0, 2, 0.0) == 1.0
    vals = [schedules.cosine(i, 10, 1.0, 0.1, 2) for i in range(2, 10)]
    assert all(a > b for a, b in zip(vals, vals[1:])) and vals[-1] > 0.1
    assert schedules.cosine(10, 10, 1.0, 0.1) == 0.1
    assert schedules.cosine(0, 10, 0.996, 1.0) == 0.996
    assert schedules.teacher_temperature(0, 0.04, 0.07, 10) == 0.04
    assert schedules.teacher_temperature(5, 0.04, 0.07, 10) == pytest.approx(0.055)
    assert schedules.teacher_temperature(30, 0.04, 0.07, 10) == 0.07


TRAIN = [
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--lr",
    "0.5",
    "--drop-path",
    "0",
    "--freeze-last-layer",
    "0",
    "--global-crop-scale",
    "0.4",
    "1",
]


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """One short run per method (shared by the tests below)."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("dirl", "dino"):
        assert cli(["pretrain", str(root / method), *cohort, *TINY, *TRAIN, "--method", method]) == 0
    return root


@pytest.mark.parametrize("method", ["dirl", "dino"])
def test_training_lowers_the_loss_and_writes_outputs(trained, method):
    import timm

    out = trained / method
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "loss_dino", "loss_dense", "lr", "wd", "teacher_temp", "momentum", "images_per_s"):
        assert key in rows[0]
    loss = [r["loss"] for r in rows]
    assert sum(loss[3:]) / 3 < loss[0] and min(loss) < 0.7 * loss[0], loss
    if method == "dino":
        assert all(r["loss_dense"] == 0 for r in rows)
    else:
        assert all(r["loss_dense"] > 0 and r["dense_pairs_per_image"] > 0 for r in rows)
    # outputs
    for name in ("checkpoint.pt", "backbone.pt", "backbone.json", "log.jsonl", "loss_curves.png"):
        assert (out / name).exists(), name
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["arch"] == "vit_tiny_patch16_224" and meta["img_size"] == 64 and meta["embed"] == "cls"
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["patch_size"] == 16 and meta["method"] == method
    model = timm.create_model(meta["arch"], num_classes=0, img_size=meta["img_size"], dynamic_img_size=True)
    model.load_state_dict(torch.load(out / "backbone.pt", weights_only=True), strict=True)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 3 and ck["step"] == 6
    assert torch.equal(ck["teacher"]["backbone.pos_embed"], model.pos_embed)  # the teacher's weights
    assert any(k.startswith("dense_head.") for k in ck["student"]) == (method == "dirl")


def test_rerun_of_a_finished_run(trained, cohort):
    out = trained / "dino"
    before = (out / "log.jsonl").read_text()
    assert cli(["pretrain", str(out), *cohort, *TINY, *TRAIN, "--method", "dino"]) == 0
    assert (out / "log.jsonl").read_text() == before


def test_resume_reproduces_the_uninterrupted_run(tmp_path, cohort):
    args = [
        *cohort,
        *TINY,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--match",
        "overlap",
        "--local-crops-number",
        "1",
        "--local-crop-size",
        "32",
        "--checkpoint-every-steps",
        "1",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli(["pretrain", str(full), *args]) == 0
    assert cli(["pretrain", str(part), *args, "--stop-after-steps", "1"]) == 0  # mid-epoch
    assert len(_losses(part)) == 1 and not (part / "backbone.pt").exists()
    assert cli(["pretrain", str(part), *args, "--num-workers", "2"]) == 0  # runtime setting may change
    assert _losses(part) == _losses(full)  # exact: model, teacher, optimiser, centres, RNG, data order
    a = torch.load(full / "backbone.pt", weights_only=True)
    b = torch.load(part / "backbone.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path, cohort):
    out = tmp_path / "run"
    args = [*cohort, *TINY, "--epochs", "2", "--batch-size", "8"]
    assert cli(["pretrain", str(out), *args, "--stop-after-steps", "1"]) == 0
    s = PretrainSettings(**TINY_SETTINGS, epochs=2, batch_size=8, lambda_dense=0.5, lr=0.001)
    tiles = [a for a in cohort[1 : cohort.index("--priors")]]
    priors = cohort[cohort.index("--priors") + 1 :]
    with pytest.raises(DirlError, match=r"lambda_dense.*lr|lr.*lambda_dense") as e:
        Run(out, tiles, priors, s).run()
    assert "0.5" in str(e.value)
    assert cli(["pretrain", str(out), *args, "--lr", "0.001"]) == 1  # the CLI reports it as one line
    # a workflow rerun after a settings change starts afresh
    assert cli(["pretrain", str(out), *args, "--lr", "0.001", "--restart-on-mismatch", "--stop-after-steps", "1"]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["settings"]["lr"] == 0.001 and ck["step"] == 1 and len(_losses(out)) == 1


def test_non_finite_loss_names_the_step(tmp_path, cohort, monkeypatch):
    from dirl.ssl import losses

    orig = losses.DINOLoss.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        out = orig(self, *a, **k)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(losses.DINOLoss, "forward", poisoned)
    s = PretrainSettings(**TINY_SETTINGS, epochs=2, batch_size=4)
    tiles = cohort[1 : cohort.index("--priors")]
    priors = cohort[cohort.index("--priors") + 1 :]
    with pytest.raises(DirlError, match="non-finite loss at step 2"):
        Run(tmp_path / "nan", tiles, priors, s).run()


def test_settings_validation_and_cli_flags():
    with pytest.raises(DirlError, match="match"):
        PretrainSettings(match="nearest").validate()
    with pytest.raises(DirlError, match=r"unknown setting\(s\) \['lerning_rate'\]"):
        PretrainSettings.from_dict({"lerning_rate": 1})
    s = PretrainSettings.from_dict(
        {"global_crop_scale": [0.3, 1.0], "method": "dino", "epochs": "3", "warmup_epochs": 1}
    )
    assert s.global_crop_scale == (0.3, 1.0) and s.epochs == 3 and not s.dense
    # DINO's crop scales: wider global crops without local crops
    with pytest.raises(DirlError, match="warmup_epochs = 10 is not below pretrain.epochs = 3"):
        PretrainSettings.from_dict({"epochs": 3}).validate()
    assert PretrainSettings().global_scale == (0.14, 1.0)
    assert PretrainSettings(local_crops_number=8).global_scale == (0.4, 1.0)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_two_processes_agree_with_one(tmp_path, cohort, trained):
    args = [*cohort, *TINY, *TRAIN, "--method", "dirl"]  # the same run as `trained`, on 2 processes
    one, two = trained / "dirl", tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            str(torchrun if torchrun.exists() else "torchrun"),
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "dirl.cli",
            "pretrain",
            str(two),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for key in ("loss", "loss_dino", "loss_dense"):
        assert _losses(two, key) == pytest.approx(_losses(one, key), rel=1e-4, abs=1e-5)
    _same_backbone(one, two)


def test_rewritten_priors_are_not_resumed(tmp_path):
    """After a priors setting changed Snakemake reruns pretraining; it used to resume the finished checkpoint
    (same settings, same tile counts) and hand back the old backbone byte for byte. A checkpoint of stores
    written again is refused, and the workflow's --restart-on-mismatch trains afresh on the new priors."""
    from dirl import store

    tiles, priors = write_toy_cohort(tmp_path / "cohort", n_slides=2, n_tiles=8, tile_px=64)
    args = ["--tiles", *map(str, tiles), "--priors", *map(str, priors), *TINY, "--epochs", "1", "--batch-size", "8"]
    out = tmp_path / "run"
    assert cli(["pretrain", str(out), *args]) == 0
    first = torch.load(out / "backbone.pt", weights_only=True)
    for p in priors:  # what `dirl priors` writes after phenotypes.dilate_um changed: other maps
        maps = store.open_map(p, "priors")[:]
        attrs = store.map_attrs(p, "priors")
        with store.map_store_writer(p, "priors", n=len(maps), tile_px=64, dtype="uint8", attrs=attrs) as (_, arr):
            arr[:] = np.roll(maps, 9, axis=2)
    assert cli(["pretrain", str(out), *args]) == 1  # refused: trained on other data
    assert cli(["pretrain", str(out), *args, "--restart-on-mismatch"]) == 0
    second = torch.load(out / "backbone.pt", weights_only=True)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_two_nodes_agree_with_one(tmp_path, cohort, trained):
    """`pretrain.nodes: 2` on CPU: two torchrun agents (dirl.ssl.launch, as `srun` starts one per node)
    meeting through a c10d rendezvous, one process each, train the run one process trains."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "dirl.ssl.launch", "--nnodes", "2", "--endpoint", f"127.0.0.1:{port}"]
    cmd = [*launch, "--rdzv-id", "test", "--", "pretrain", str(two), *cohort, *TINY, *TRAIN, "--method", "dirl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in "ab"]
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outs[0][-3000:] + outs[1][-3000:]
    one = trained / "dirl"
    for key in ("loss", "loss_dino", "loss_dense"):
        assert _losses(two, key) == pytest.approx(_losses(one, key), rel=1e-4, abs=1e-5)
    _same_backbone(one, two)
    assert (
        json.loads((two / "backbone.json").read_text())["settings"]
        == json.loads((one / "backbone.json").read_text())["settings"]
    )
