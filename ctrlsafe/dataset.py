"""The generated data set on disk: Parquet shards + manifest.json, written so a kill -9 loses nothing.

Layout of an output directory:

    DIR/manifest.json             config, versions, control spec, bins, model identities, counts,
                                  finished prompt ranges (rewritten atomically: temp file + rename)
    DIR/data/chunk-000000.parquet one shard per finished chunk of prompts (temp file + rename)

A chunk is a fixed range of prompts `[k * chunk_size, (k + 1) * chunk_size)`. A shard file exists
under its final name only once it is complete, so the set of shard files *is* the set of finished
chunks: resume removes leftover `*.tmp` files and skips chunks whose shard exists. The manifest's
`finished_ranges` repeats that list for readers; if a kill lands between a shard's rename and the
manifest update the shard wins. Shard names depend only on the chunk, never on the rank that wrote
it, so a torchrun job and a single process produce the same files.

Columns (one row per sample): id, prompt_id, prompt, messages (JSON string or null), requested
(struct attr->int, null when no control was requested), control (struct attr->int: the *measured*
levels), sample_index, response, scores (struct attr->float), finish_reason, kept, drop_reason.
Every shard is written with a fixed schema (`record_schema`, `pairs_schema`): a column null in a
whole shard keeps its type, so `pyarrow.dataset` / `datasets.load_dataset("parquet", ...)` read a
directory of shards as one table.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
DATA_DIR = "data"
FORMAT = "ctrlsafe-dataset"
FORMAT_VERSION = 1
_TMP = ".tmp"


def record_schema(attributes) -> pa.Schema:
    levels = pa.struct([(a, pa.int32()) for a in attributes])
    return pa.schema([
        ("id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("messages", pa.string()),
        ("requested", levels),
        ("control", levels),
        ("sample_index", pa.int32()),
        ("response", pa.string()),
        ("scores", pa.struct([(a, pa.float32()) for a in attributes])),
        ("finish_reason", pa.string()),
        ("kept", pa.bool_()),
        ("drop_reason", pa.string()),
    ])


def pairs_schema(attributes) -> pa.Schema:
    """`ctrlsafe distill --pairs` shards: TRL prompt/chosen/rejected plus where each side came from."""
    levels = pa.struct([(a, pa.int32()) for a in attributes])
    return pa.schema([
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("prompt_id", pa.string()),
        ("messages", pa.string()),
        ("attribute", pa.string()),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("control", levels),
        ("chosen_control", levels),
        ("rejected_control", levels),
    ])


def records_to_table(records: list[dict], attributes) -> pa.Table:
    """Rows in the fixed record schema: a column that is null in every row of a shard (messages of
    plain prompts, requested without controls) keeps its real type, so shards always concatenate."""
    return pa.Table.from_pylist(records, schema=record_schema(attributes))


def pairs_to_table(pairs: list[dict], attributes) -> pa.Table:
    return pa.Table.from_pylist(pairs, schema=pairs_schema(attributes))


# -- atomic writes -----------------------------------------------------------------------------------
def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # the bytes are on disk before the name says the file is complete
    os.replace(tmp, path)


def write_table(table: pa.Table, path: Path) -> Path:
    """Write a Parquet file under a temp name, then rename it into place. Deterministic bytes:
    fixed options, no timestamps (pyarrow writes none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + _TMP)
    pq.write_table(table, tmp, compression="zstd", row_group_size=65536)
    _replace(tmp, path)
    return path


def write_json(obj: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + _TMP)
    tmp.write_text(json.dumps(obj, indent=2) + "\n")  # key order kept: bins edges follow the spec order
    _replace(tmp, path)


# -- shards and progress -----------------------------------------------------------------------------
def shard_path(out, chunk: int) -> Path:
    return Path(out) / DATA_DIR / f"chunk-{chunk:06d}.parquet"


def shard_files(out) -> list[Path]:
    return sorted((Path(out) / DATA_DIR).glob("*.parquet"))


def finished_chunks(out) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in (Path(out) / DATA_DIR).glob("chunk-*.parquet")}


def remove_temp_files(out) -> int:
    """Remove what a killed writer left behind; returns how many files."""
    n = 0
    for p in list(Path(out).glob("*" + _TMP)) + list((Path(out) / DATA_DIR).glob("*" + _TMP)):
        p.unlink(missing_ok=True)
        n += 1
    return n


def finished_ranges(chunks, chunk_size: int, n_prompts: int) -> list[list[int]]:
    """Finished chunks as merged [start, end) prompt ranges."""
    out: list[list[int]] = []
    for c in sorted(chunks):
        start, end = c * chunk_size, min((c + 1) * chunk_size, n_prompts)
        if out and out[-1][1] == start:
            out[-1][1] = end
        else:
            out.append([start, end])
    return out


# -- the manifest and the run it describes -----------------------------------------------------------
def read_manifest(out) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt manifest ({e.msg}); it is written atomically, so something else wrote it") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a ctrlsafe data set manifest (format {manifest.get('format')!r})")
    return manifest


UNFINISHED = ("running", "failed")  # manifest statuses of a run that did not complete


def writer_identity() -> dict:
    """Who is writing a run (stored in its manifest): lets check_out_dir tell a live run from a dead one."""
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid()}


def _writer_alive(manifest: dict) -> int | None:
    """The pid of another live process on this host that the manifest names as its writer, else None."""
    import socket

    w = manifest.get("writer") or {}
    pid = w.get("pid")
    if manifest.get("status") != "running" or not isinstance(pid, int) or w.get("host") != socket.gethostname() or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # exists, another user's
        return pid
    return pid


def mark_failed(out, error: BaseException) -> None:
    """Record in the manifest that the run stopped on an error (best effort: never hides the error)."""
    try:
        manifest = read_manifest(out)
        if manifest is None or manifest.get("status") == "complete":
            return
        import time

        manifest.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                        updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(manifest, Path(out) / MANIFEST)
    except Exception:  # noqa: BLE001 - the original error matters more
        pass


def check_out_dir(out, config: dict, resume: bool) -> dict | None:
    """Refuse an output directory that holds something else; return the manifest to resume from.

    Empty or missing directory: a fresh run (also with --resume). A run that never finished (status
    running or failed) and wrote no shard: nothing to protect, so a fresh run takes the directory
    over, with any config (unless that run's process is still alive on this host: it may just be
    loading its models). A run with data and the same config: allowed only with --resume. A run
    with data and a different config, or files without a manifest: refused.
    """
    out = Path(out)
    manifest = read_manifest(out)
    if manifest is None:
        stray = [p.name for p in out.iterdir()] if out.is_dir() else []
        if stray:
            raise FileExistsError(f"{out} is not empty and holds no {MANIFEST} ({', '.join(sorted(stray)[:5])}); choose a new --out")
        return None
    status = manifest.get("status")
    shards = shard_files(out)
    if status in UNFINISHED and not shards:
        pid = _writer_alive(manifest)
        if pid is not None:
            raise FileExistsError(f"{out} is being written by process {pid} on this host (status running, no shard yet); "
                                  f"wait for it, stop it, or choose a new --out")
        return None
    differ = sorted(k for k in set(config) | set(manifest["config"]) if config.get(k) != manifest["config"].get(k))
    held = f"{status}, {len(shards)} shard{'s' * (len(shards) != 1)}"
    if differ:
        raise FileExistsError(
            f"{out} holds a different run ({held}; config differs in: {', '.join(differ)}); its data is kept: "
            f"continue it with its own options and --resume, choose a new --out, or delete {out} to start over"
        )
    if not resume:
        raise FileExistsError(f"{out} already holds this run ({held}); pass --resume to continue it, choose a new --out, "
                              f"or delete {out} to start over")
    return manifest


def claim_out_dir(out, command: str) -> None:
    """--out of a command that writes its whole output in one go from an input it leaves alone
    (`ctrlsafe distill`, `ctrlsafe score` into a directory; no --resume). The directory must be
    missing or empty, or hold a run of the same command that did not finish: status failed (it
    stopped on an error, `mark_failed`) or running with no live writer (killed). Such a run's shards
    are incomplete and derived from an input that is still there, so they are removed and the
    (corrected) command starts over. Anything else is refused."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    manifest = read_manifest(out)
    status = (manifest or {}).get("status")
    if manifest is None or status not in UNFINISHED or command not in (manifest.get("config") or {}):
        what = f"a finished `ctrlsafe {command}` output" if manifest is not None and status == "complete" else (
            f"a data set (status {status})" if manifest is not None else f"no {MANIFEST}")
        raise FileExistsError(f"{out} is not empty ({what}); choose a new --out or delete it")
    pid = _writer_alive(manifest)
    if pid is not None:
        raise FileExistsError(f"{out} is being written by process {pid} on this host; wait for it, stop it, or choose a new --out")
    for p in shard_files(out):
        p.unlink()
    remove_temp_files(out)


# -- reading back --------------------------------------------------------------------------------------
def open_dataset(path) -> pads.Dataset:
    """A pyarrow dataset over a data set directory (or its data/ folder, or one shard)."""
    path = Path(path)
    if (path / DATA_DIR).is_dir():
        path = path / DATA_DIR
    if path.is_dir() and not any(path.glob("*.parquet")):
        raise FileNotFoundError(f"{path}: no Parquet shards")
    if not path.exists():
        raise FileNotFoundError(f"data set {path} does not exist")
    if not path.is_dir():
        return pads.dataset(str(path), format="parquet")
    files = sorted(map(str, path.glob("*.parquet")))
    # one schema over all shards: shards from before fixed schemas could type an all-null column `null`
    schemas = [pq.read_schema(f) for f in files]
    schema = schemas[0] if all(s.equals(schemas[0]) for s in schemas) else pa.unify_schemas(schemas)
    return pads.dataset(files, schema=schema, format="parquet")


def read_dataset(path, columns=None, kept_only: bool = False) -> pa.Table:
    """The whole data set as one table, in shard order (chunk order = prompt order)."""
    ds = open_dataset(path)
    return ds.to_table(columns=columns, filter=pads.field("kept") if kept_only else None)


# -- identities -----------------------------------------------------------------------------------------
def sha256_file(path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(path: Path) -> str:
    """sha256 of a weight file, remembered in the user cache per (path, size, mtime, inode): a 7B
    checkpoint takes ~20 s to hash, and every run of a pipeline names the same models."""
    from ctrlsafe.presets import cache_dir

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    store = cache_dir() / "sha256.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = sha256_file(path)
        try:  # a read-only or shared home only costs the next run a re-hash
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
            os.replace(tmp, store)
        except OSError:
            pass
    return known[key]


def weights_identity(path) -> dict:
    """{"path", "sha256": {file: hex}} over a model directory's weight files (or one file)."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path.resolve()), "sha256": {path.name: weights_sha256(path)}}
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    return {"path": str(path.resolve()), "sha256": {p.name: weights_sha256(p) for p in files}}
