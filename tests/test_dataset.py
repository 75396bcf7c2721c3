"""Data set writer: atomic deterministic shards, progress from shard files, out-dir checks, reading back."""
import hashlib
import json
import os

import pyarrow.dataset as pads
import pytest

from ctrlsafe import dataset

ATTRS = ("helpful", "harmless")


def _records(n, prompt="p"):
    return [{
        "id": f"{prompt}/{i}/0", "prompt_id": prompt, "prompt": "Hi?", "messages": None,
        "requested": {"helpful": i % 5, "harmless": 0} if i % 2 else None,
        "control": {"helpful": i % 5, "harmless": 1}, "sample_index": 0, "response": f"answer {i}",
        "scores": {"helpful": 0.5 * i, "harmless": -1.0}, "finish_reason": "eos", "kept": i % 3 != 0,
        "drop_reason": "empty" if i % 3 == 0 else None,
    } for i in range(n)]


def test_shards_are_atomic_and_byte_identical(tmp_path):
    """The same records write the same bytes twice; no temp file remains; the schema is the documented one."""
    t = dataset.records_to_table(_records(7), ATTRS)
    a = dataset.write_table(t, dataset.shard_path(tmp_path / "a", 0))
    b = dataset.write_table(t, dataset.shard_path(tmp_path / "b", 0))
    assert a.read_bytes() == b.read_bytes()
    assert not list((tmp_path / "a" / "data").glob("*.tmp"))
    assert t.schema.names == ["id", "prompt_id", "prompt", "messages", "requested", "control", "sample_index",
                              "response", "scores", "finish_reason", "kept", "drop_reason"]
    assert t.column("requested").to_pylist()[0] is None  # a no-control row has a null struct


def test_progress_comes_from_shard_files(tmp_path):
    """Finished chunks are the shard files present; temp leftovers are removed; ranges merge."""
    for c in (0, 1, 3):
        dataset.write_table(dataset.records_to_table(_records(2, f"p{c}"), ATTRS), dataset.shard_path(tmp_path, c))
    (tmp_path / "data" / "chunk-000002.parquet.tmp").write_bytes(b"half a file")
    (tmp_path / "manifest.json.tmp").write_text("{")
    assert dataset.finished_chunks(tmp_path) == {0, 1, 3}
    assert dataset.remove_temp_files(tmp_path) == 2
    assert dataset.finished_ranges({0, 1, 3}, chunk_size=4, n_prompts=14) == [[0, 8], [12, 14]]


def test_out_dir_checks(tmp_path):
    """Fresh dirs pass; stray files, another run's config and a rerun without --resume are refused
    once the run holds data, and the refusal names --resume and deleting the folder."""
    out = tmp_path / "run"
    assert dataset.check_out_dir(out, {"seed": 0}, resume=False) is None
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty and holds no manifest.json"):
        dataset.check_out_dir(out, {"seed": 0}, resume=True)
    (out / "notes.txt").unlink()
    dataset.write_json({"format": dataset.FORMAT, "config": {"seed": 0, "samples": 2}, "status": "running"}, out / "manifest.json")
    dataset.write_table(dataset.records_to_table(_records(2), ATTRS), dataset.shard_path(out, 0))
    with pytest.raises(FileExistsError, match=r"different run \(running, 1 shard; config differs in: samples, seed\)") as e:
        dataset.check_out_dir(out, {"seed": 1, "samples": 4}, resume=True)
    assert "--resume" in str(e.value) and f"delete {out}" in str(e.value)
    with pytest.raises(FileExistsError, match="pass --resume"):
        dataset.check_out_dir(out, {"seed": 0, "samples": 2}, resume=False)
    assert dataset.check_out_dir(out, {"seed": 0, "samples": 2}, resume=True)["status"] == "running"


@pytest.mark.parametrize("status", ["running", "failed"])
def test_unfinished_run_without_data_can_be_replaced(status, tmp_path):
    """A run that stopped before its first shard (a failed validation, a crash while loading models)
    holds nothing to protect: a new command, with any config, with or without --resume, takes the folder."""
    out = tmp_path / "run"
    dataset.write_json({"format": dataset.FORMAT, "config": {"seed": 0}, "status": status,
                        "writer": {"host": "elsewhere", "pid": 1}}, out / "manifest.json")
    assert dataset.check_out_dir(out, {"seed": 1, "samples": 4}, resume=False) is None
    assert dataset.check_out_dir(out, {"seed": 0}, resume=False) is None
    assert dataset.check_out_dir(out, {"seed": 0}, resume=True) is None
    dataset.write_json({"format": dataset.FORMAT, "config": {"seed": 0}, "status": "complete"}, out / "manifest.json")
    with pytest.raises(FileExistsError, match="different run"):  # a complete run is never replaced
        dataset.check_out_dir(out, {"seed": 1}, resume=False)


def test_live_writer_without_data_is_not_replaced(tmp_path):
    """A "running" run with no shard yet whose writer process is alive on this host (say, still
    loading a 7B model) is not taken over; once that process is gone, it is."""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dataset.write_json({"format": dataset.FORMAT, "config": {"seed": 0}, "status": "running",
                            "writer": {**dataset.writer_identity(), "pid": proc.pid}}, out / "manifest.json")
        with pytest.raises(FileExistsError, match=f"being written by process {proc.pid}"):
            dataset.check_out_dir(out, {"seed": 1}, resume=False)
    finally:
        proc.kill()
        proc.wait()
    assert dataset.check_out_dir(out, {"seed": 1}, resume=False) is None


def test_mark_failed(tmp_path):
    """mark_failed records the error in an unfinished manifest and leaves a complete one alone."""
    dataset.write_json({"format": dataset.FORMAT, "config": {}, "status": "running"}, tmp_path / "manifest.json")
    dataset.mark_failed(tmp_path, ValueError("bad --thing"))
    m = dataset.read_manifest(tmp_path)
    assert m["status"] == "failed" and m["error"] == "ValueError: bad --thing"
    dataset.write_json({"format": dataset.FORMAT, "config": {}, "status": "complete"}, tmp_path / "manifest.json")
    dataset.mark_failed(tmp_path, ValueError("late"))
    assert dataset.read_manifest(tmp_path)["status"] == "complete"
    dataset.mark_failed(tmp_path / "missing", ValueError("no manifest"))  # never raises


def test_corrupt_or_foreign_manifest(tmp_path):
    """A manifest that is not ours (or not JSON) is named, never overwritten silently."""
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a ctrlsafe data set manifest"):
        dataset.check_out_dir(tmp_path, {}, resume=True)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt manifest"):
        dataset.read_manifest(tmp_path)


def test_read_back_with_pyarrow_dataset(tmp_path):
    """Shards load as one standard Parquet data set (what datasets.load_dataset("parquet") reads); kept_only filters."""
    for c in range(3):
        dataset.write_table(dataset.records_to_table(_records(6, f"p{c}"), ATTRS), dataset.shard_path(tmp_path, c))
    full = dataset.read_dataset(tmp_path)
    assert full.num_rows == 18 and full.column("prompt_id").to_pylist()[::6] == ["p0", "p1", "p2"]
    assert dataset.read_dataset(tmp_path, kept_only=True).num_rows == 12
    plain = pads.dataset(str(tmp_path / "data"), format="parquet").to_table()
    assert plain.num_rows == 18 and plain.column("scores").to_pylist()[1] == {"helpful": 0.5, "harmless": -1.0}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Parquet shards"):
        dataset.read_dataset(tmp_path / "empty")


def test_weights_identity_hashes_weight_files(tmp_path, monkeypatch):
    """Identity lists the sha256 of every weight file; a second run takes it from the cache
    without reading the file; a rewritten file (new mtime) is hashed again."""
    monkeypatch.setenv("CTRLSAFE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"abc")
    (model / "config.json").write_text("{}")
    ident = dataset.weights_identity(model)
    assert ident["sha256"] == {"model.safetensors": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    with monkeypatch.context() as m:
        m.setattr(dataset, "sha256_file", lambda path: pytest.fail("hashed again despite the cache"))
        assert dataset.weights_identity(model) == ident
    (model / "model.safetensors").write_bytes(b"abd")
    st = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a later write
    assert dataset.weights_identity(model)["sha256"]["model.safetensors"] == hashlib.sha256(b"abd").hexdigest()


def _pairs(n, prompt, messages):
    lv = {"helpful": 1, "harmless": 0}
    return [{"prompt": "Hi?", "chosen": f"good {i}", "rejected": f"bad {i}", "prompt_id": prompt, "messages": messages,
             "attribute": "helpful", "chosen_id": f"{prompt}/{i}/a", "rejected_id": f"{prompt}/{i}/b",
             "control": lv, "chosen_control": lv, "rejected_control": {"helpful": 0, "harmless": 0}} for i in range(n)]


def test_all_null_columns_keep_their_type_across_shards(tmp_path):
    """A shard of plain prompts (messages null in every row, no requested controls) and a shard of
    chat prompts have the same schema, so a directory of them reads as one table with plain
    pyarrow.dataset -- records and pairs alike (the failure datasets.load_dataset("parquet") hit)."""
    chat = json.dumps([{"role": "user", "content": "Hi?"}])
    plain_rows = [{**r, "requested": None} for r in _records(3, "plain")]
    chat_rows = [{**r, "messages": chat} for r in _records(3, "chat")]
    dataset.write_table(dataset.records_to_table(plain_rows, ATTRS), dataset.shard_path(tmp_path / "rec", 0))
    dataset.write_table(dataset.records_to_table(chat_rows, ATTRS), dataset.shard_path(tmp_path / "rec", 1))
    t = pads.dataset(str(tmp_path / "rec" / "data"), format="parquet").to_table()
    assert t.schema == dataset.record_schema(ATTRS)
    assert t.column("messages").to_pylist() == [None] * 3 + [chat] * 3
    dataset.write_table(dataset.pairs_to_table(_pairs(2, "plain", None), ATTRS), dataset.shard_path(tmp_path / "pairs", 0))
    dataset.write_table(dataset.pairs_to_table(_pairs(2, "chat", chat), ATTRS), dataset.shard_path(tmp_path / "pairs", 1))
    t = pads.dataset(str(tmp_path / "pairs" / "data"), format="parquet").to_table()
    assert t.schema == dataset.pairs_schema(ATTRS) and t.column("messages").null_count == 2


def test_open_dataset_reads_old_shards_with_null_typed_columns(tmp_path):
    """Shards written before fixed schemas (messages typed null in one, string in another) still
    read through ctrlsafe's own reader: it unifies the shard schemas."""
    import pyarrow as pa

    chat = json.dumps([{"role": "user", "content": "Hi?"}])
    dataset.write_table(pa.Table.from_pylist(_pairs(2, "plain", None)), dataset.shard_path(tmp_path, 0))
    dataset.write_table(pa.Table.from_pylist(_pairs(2, "chat", chat)), dataset.shard_path(tmp_path, 1))
    t = dataset.read_dataset(tmp_path)
    assert t.num_rows == 4 and t.column("messages").to_pylist() == [None, None, chat, chat]
