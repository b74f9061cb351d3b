"""Stage files: what every stage does with the files it reads and writes.

Each stage reads JSONL files (one JSON object per line) and writes new ones.
Three rules keep a student's data safe, and this module holds them:

- A file is complete or absent. Every output is written to `<name>.tmp` and
  renamed (`write_atomic`): a rename is atomic, so a kill leaves the old
  file or the new one, never half of one.
- A killed stage resumes. The work is cut into units (a fixed batch of
  messages, in a fixed order, each with its own seed from `unit_seed`), so a
  unit's result does not depend on when or where it ran. `run_units` appends
  each finished unit to `<output>.partial` as one line, flushed to disk; a
  rerun skips the finished units, drops a torn last line, and ends with the
  same file as a run that was never stopped. A partial file made with other
  settings (its first line, the header) is not reused.
- A bad line gets one clear error. `read_jsonl` names the file and line of
  anything that is not a JSON object with the fields asked for.

Several processes (`torchrun --nproc_per_node=N generate.py ...`): unit i
belongs to process i % N; each writes its own partial file, and every
process reads them all back after a barrier.

Used by generate.py and rank.py (units, partial files), and by every stage
(`read_jsonl`, `write_atomic`).
Read next: generate.py.
"""
import glob
import hashlib
import json
import os
import sys
from datetime import timedelta

import torch
from tqdm import tqdm

from character import InputError


def unit_seed(seed, phase, index):
    """A seed for one unit of work, from the run's seed, the phase and the unit's index."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{phase}/{index}".encode()).digest()[:4], "little")


def init_distributed(device):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) join the
    process group: NCCL between GPUs, gloo between CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # Shards can take very different times; the default 10-minute barrier timeout is too short.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=12))
    return dist.get_rank(), world, device


def barrier(world):
    if world > 1:
        torch.distributed.barrier()


def finish_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def partial_files(path):
    """Every partial file of an output: `<path>.partial` and `<path>.partial.rank<r>`."""
    return sorted(glob.glob(glob.escape(path) + ".partial*"))


def read_partial(file, header):
    """The finished units in a partial file, {unit: data}, and the byte length of
    its complete lines; None if the file was made with other settings. A torn
    last line (the process died while writing it) is ignored."""
    with open(file, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1             # everything after the last newline is torn
    lines = data[:end].splitlines()
    try:
        if not lines or json.loads(lines[0]).get("header") != header:
            return None, 0
    except (json.JSONDecodeError, AttributeError):
        return None, 0
    units = {}
    for n, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
            units.setdefault(record["unit"], record["data"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{file} line {n}: corrupted record (delete the file to redo this step)") from None
    return units, end


def run_units(n_units, do_unit, path, header, rank=0, world=1, desc="", prog="generate.py"):
    """Run do_unit(i) for i in range(n_units), resumably; returns the list of
    results in unit order (on every process).

    Unit i belongs to process i % world. Finished units are appended to this
    process's partial file as one JSON line each and flushed to disk; units
    found in any partial file made with the same `header` (the settings) are
    not run again, whichever process or run made them."""
    header = json.loads(json.dumps(header))     # as it will read back from disk
    done = {}
    for file in partial_files(path):
        units, _ = read_partial(file, header)
        if units is None and rank == 0:
            print(f"{prog}: note: ignoring {file}: made with other settings", file=sys.stderr)
        done.update(units or {})
    own = f"{path}.partial" if world == 1 else f"{path}.partial.rank{rank}"
    units, valid_length = read_partial(own, header) if os.path.exists(own) else (None, 0)
    if units is None:                           # start the file afresh
        os.makedirs(os.path.dirname(os.path.abspath(own)), exist_ok=True)
        with open(own, "w", encoding="utf-8") as f:
            f.write(json.dumps({"header": header}) + "\n")
    else:                                       # drop a torn last line before appending
        os.truncate(own, valid_length)
    mine = [i for i in range(n_units) if i % world == rank]
    todo = [i for i in mine if i not in done]
    with open(own, "a", encoding="utf-8") as f, \
            tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, disable=rank != 0) as bar:
        for i in todo:
            result = do_unit(i)
            f.write(json.dumps({"unit": i, "data": result}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(1)
    barrier(world)
    merged = {}
    for file in partial_files(path):
        units, _ = read_partial(file, header)
        merged.update({k: v for k, v in (units or {}).items() if k not in merged})
    missing = [i for i in range(n_units) if i not in merged]
    if missing:
        raise InputError(f"{path}: units {missing[:5]} missing after the run (a partial file was removed meanwhile?)")
    return [merged[i] for i in range(n_units)]


def remove_partials(path):
    for file in partial_files(path):
        os.remove(file)


def write_atomic(path, text):
    """Write to a temporary name, then rename: the file is complete or absent."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path, records):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path, required=()):
    """The records of a JSONL file; InputError naming the line for anything unreadable."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path} line {n}: not valid JSON (corrupted?)") from None
            if not isinstance(record, dict):
                raise InputError(f"{path} line {n}: expected a JSON object")
            missing = [k for k in required if k not in record]
            if missing:
                raise InputError(f"{path} line {n}: missing field {missing[0]!r}")
            records.append(record)
    if not records:
        raise InputError(f"{path}: empty")
    return records
