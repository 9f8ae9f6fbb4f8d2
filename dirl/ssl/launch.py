"""One torchrun agent per node of a SLURM allocation (`pretrain.nodes` > 1), started by `srun`:

    srun --nodes N --ntasks-per-node 1 python -m dirl.ssl.launch --gpus G -- pretrain OUT --tiles ...

Each agent starts G processes (one per GPU; one on a CPU node) and joins the others through torchrun's c10d
rendezvous on the allocation's first node, keyed by the SLURM job id: the standard multi-node launch of
PyTorch on SLURM. Ranks, the global batch (per-process batch x processes), data sharding, rank-0
checkpoints and resume are those of one node (dirl.ssl.train). Outside SLURM (a test, a machine of one's
own) `--nnodes`, `--endpoint` and `--rdzv-id` say the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

PORT = 29500  # torchrun's default rendezvous port


def first_node(nodelist: str) -> str:
    """The first host of a SLURM node list (`node[01-04]`), as SLURM itself expands it."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def torchrun_args(gpus: int, nnodes: int, endpoint: str, rdzv_id: str) -> list[str]:
    return [
        f"--nnodes={nnodes}",
        f"--nproc_per_node={max(1, gpus)}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        f"--rdzv_id={rdzv_id}",
        "--max_restarts=0",  # a failed node fails the job; Snakemake's retry resumes from the checkpoint
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dirl.ssl.launch", description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=0, help="GPUs per node: one process each (0: one CPU process)")
    p.add_argument("--nnodes", type=int, help="nodes (default: SLURM_NNODES)")
    p.add_argument("--endpoint", help=f"rendezvous host:port (default: the allocation's first node:{PORT})")
    p.add_argument("--rdzv-id", help="rendezvous id (default: SLURM_JOB_ID)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- and the dirl command, e.g. pretrain OUT ...")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    nnodes = a.nnodes or int(os.environ.get("SLURM_NNODES", "0"))
    endpoint = a.endpoint or (f"{first_node(os.environ['SLURM_JOB_NODELIST'])}:{PORT}" if nnodes else None)
    rdzv_id = a.rdzv_id or os.environ.get("SLURM_JOB_ID")
    if not (nnodes and endpoint and rdzv_id and command):
        p.error("outside a SLURM allocation give --nnodes, --endpoint and --rdzv-id, and the command after --")
    args = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(a.gpus, nnodes, endpoint, rdzv_id)]
    os.execv(sys.executable, [*args, "-m", "dirl.cli", *command])


if __name__ == "__main__":
    main()
