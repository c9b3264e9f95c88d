"""Several torchrun jobs for the price of one launch (tests/test_distributed.py; not a test module).

    torchrun --standalone --nproc_per_node=2 tests/dist_driver.py JOBS.json

JOBS.json is a list of jobs, run in order in every rank:

    {"name": "ddp", "entry": "train.py", "args": [...], "copy": [[src, dst], ...]}

Each rank runs each job as `python ENTRY ARGS` would run it (runpy, as __main__, sys.argv set), with its
stdout and stderr (file descriptors 1 and 2) going to NAME.RANK.out and NAME.RANK.err next to JOBS.json, and
writes every job's exit status to results.RANK.json as it goes: 0, a SystemExit's code, or 1 after an
uncaught exception (its traceback in the .err file). A failed job does not stop the jobs after it.

Between jobs torchrun's processes stay and only the process group is new: an entry script joins a group
that is already up (gpt/train/dist.py `setup`) and destroys it when its run ends, so before each job this
driver starts the job's own group on torchrun's store, under a prefix of its own (stale keys of the jobs
before it stay out of its way). Then rank 0 makes the job's copies (`copy`: a finished run's folder, for a
resume) while the other ranks wait in a barrier.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as torch_dist

ROOT = Path(__file__).resolve().parents[1]
GROUP_TIMEOUT = timedelta(seconds=120)  # a rank stuck waiting for a failed peer gives up (that job fails)


def run_entry(entry: str, args: list[str]) -> int:
    """`python ENTRY ARGS` in this process; its exit status."""
    argv, path0 = sys.argv, sys.path[0]
    sys.argv, sys.path[0] = [entry, *args], str(ROOT)
    try:
        runpy.run_path(str(ROOT / entry), run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - the traceback is what `python ENTRY` would print
        traceback.print_exc()
        return 1
    finally:
        sys.argv, sys.path[0] = argv, path0


def run_job(job: dict, index: int, store, rank: int, world_size: int, folder: Path) -> int:
    """Start the job's process group, make its copies (rank 0), run it with fds 1 and 2 in its files."""
    torch_dist.init_process_group("gloo", store=torch_dist.PrefixStore(f"job{index}/", store), rank=rank,
                                  world_size=world_size, timeout=GROUP_TIMEOUT)
    if rank == 0:
        for src, dst in job.get("copy", []):
            shutil.copytree(src, dst)
    torch_dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(folder / f"{job['name']}.{rank}.out", "wb") as out, open(folder / f"{job['name']}.{rank}.err", "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
    try:
        return run_entry(job["entry"], job["args"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        if torch_dist.is_initialized():  # the entry failed before its own cleanup
            torch_dist.destroy_process_group()


def main(jobs_file: Path) -> None:
    jobs, folder = json.loads(jobs_file.read_text()), jobs_file.parent
    store, rank, world_size = next(torch_dist.rendezvous("env://"))  # torchrun's store (its env variables)
    results: dict[str, int] = {}
    for index, job in enumerate(jobs):
        results[job["name"]] = run_job(job, index, store, rank, world_size, folder)
        (folder / f"results.{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
