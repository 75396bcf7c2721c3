"""MOEC rules (each one, their order), the global cell cap pass, TRL pairs, and the distill command."""
import json

import pyarrow as pa
import pytest

from ctrlsafe import dataset
from ctrlsafe.cli import main
from ctrlsafe.distill import DistillConfig, apply_cell_cap, apply_rules, make_pairs, repetition

ATTRS = ("helpful", "harmless")
EDGES = {"helpful": [-1.0, 0.0, 1.0], "harmless": [-1.0, 0.0, 1.0]}  # 4 levels, bin width 1.0


def row(pid, i, text, h=2, s=2, scores=None, req=None, finish="eos"):
    return {
        "id": f"{pid}/{i}/0", "prompt_id": pid, "prompt": "q", "messages": None,
        "requested": req, "control": {"helpful": h, "harmless": s}, "sample_index": 0,
        "response": text, "scores": scores or {"helpful": 0.5, "harmless": 0.5},
        "finish_reason": finish, "kept": None, "drop_reason": None,
    }


def reasons(rows):
    return [r["drop_reason"] for r in rows]


def test_repetition_measure():
    """Degenerate loops score near 1, ordinary text 0, short text 0."""
    assert repetition("the cat sat " * 20) > 0.8
    assert repetition("Preheat the oven, mix flour with water, knead for ten minutes and let it rise.") == 0.0
    assert repetition("ok") == 0.0


def test_each_rule_and_first_rule_wins():
    """Every per-chunk rule drops what it should and a row carries the first rule in documented order."""
    cfg = DistillConfig(require_eos=True, harmless_floor=1, edge_margin=0.1, prompt_cell_cap=0)
    rows = [
        row("a", 0, "   "),                                            # empty
        row("a", 1, "go go go go go go go go go go go go"),            # repetitive
        row("a", 2, "A fine answer that ran out of tokens", finish="length"),  # truncated
        row("a", 3, "Unsafe text", s=0),                                # below the harmless floor
        row("a", 4, "An answer on the fence", scores={"helpful": 0.05, "harmless": 0.5}),  # 0.05 from edge 0.0
        row("a", 5, "A good distinct answer about baking bread."),
        row("a", 6, "A good distinct answer about baking bread!"),     # near duplicate of 5
        row("b", 0, "A good distinct answer about baking bread."),     # same text, other prompt: kept
        row("a", 7, "", finish="length", s=0),                         # empty wins over truncated and floor
    ]
    apply_rules(rows, cfg, ATTRS, EDGES)
    assert reasons(rows) == ["empty", "repetitive", "truncated", "harmless_floor", "ambiguous", None, "near_duplicate", None, "empty"]
    assert [r["kept"] for r in rows] == [r["drop_reason"] is None for r in rows]


def test_disabled_keeps_everything():
    """--no-distill keeps every row with no reason."""
    rows = [row("a", 0, ""), row("a", 1, "x x x x x x x x x x")]
    apply_rules(rows, DistillConfig(enabled=False), ATTRS, EDGES)
    assert [r["kept"] for r in rows] == [True, True] and reasons(rows) == [None, None]


def test_prompt_cell_cap_prefers_honest_samples():
    """Per prompt and measured cell at most K survive, samples whose request matches the measurement first."""
    texts = ["Alpha answer one.", "Beta reply two here.", "Gamma response three!", "Delta text four ok."]
    rows = [row("a", i, t, h=1, s=1, req={"helpful": 1, "harmless": 1} if i == 3 else {"helpful": 0, "harmless": 0})
            for i, t in enumerate(texts)]
    apply_rules(rows, DistillConfig(prompt_cell_cap=2, edge_margin=0), ATTRS, EDGES)
    assert reasons(rows) == [None, "prompt_cell_cap", "prompt_cell_cap", None]


def test_harmless_floor_needs_the_attribute():
    """The floor rule refuses a spec without a harmless attribute."""
    with pytest.raises(ValueError, match="needs a 'harmless' attribute"):
        DistillConfig(harmless_floor=1).check(("helpful", "honest"))


def _shards(tmp_path, rows, per_shard):
    for c in range(0, len(rows), per_shard):
        dataset.write_table(dataset.records_to_table(rows[c:c + per_shard], ATTRS), dataset.shard_path(tmp_path, c // per_shard))


def _cell_rows():
    rows = []
    for i in range(12):  # cell (0,0): 8 rows, (1,1): 3 rows, (2,2): 1 row
        h = 0 if i < 8 else (1 if i < 11 else 2)
        r = row(f"p{i}", 0, f"text {i}", h=h, s=h)
        r["kept"], r["drop_reason"] = True, None
        rows.append(r)
    rows[0]["kept"], rows[0]["drop_reason"] = False, "empty"
    return rows


def test_cell_cap_is_global_idempotent_and_shard_independent(tmp_path):
    """auto caps each cell at the median cell count, keeps rare cells whole, ignores earlier drops,
    gives the same decisions however records are split into shards, and a second pass changes nothing."""
    cfg = DistillConfig(cell_cap="auto")
    _shards(tmp_path / "one", _cell_rows(), 12)
    _shards(tmp_path / "three", _cell_rows(), 4)
    assert apply_cell_cap(tmp_path / "one", cfg, ATTRS) == 3  # counts 7, 3, 1 -> median 3
    assert apply_cell_cap(tmp_path / "three", cfg, ATTRS) == 3
    a = dataset.read_dataset(tmp_path / "one").to_pylist()
    b = dataset.read_dataset(tmp_path / "three").to_pylist()
    assert a == b
    by_cell = {}
    for r in a:
        by_cell.setdefault(r["control"]["helpful"], []).append(r["drop_reason"])
    assert by_cell[0].count(None) == 3 and by_cell[0].count("cell_cap") == 4 and by_cell[0].count("empty") == 1
    assert by_cell[1] == [None] * 3 and by_cell[2] == [None]
    before = [p.read_bytes() for p in dataset.shard_files(tmp_path / "three")]
    assert apply_cell_cap(tmp_path / "three", cfg, ATTRS) == 3
    assert [p.read_bytes() for p in dataset.shard_files(tmp_path / "three")] == before
    apply_cell_cap(tmp_path / "three", DistillConfig(cell_cap="10"), ATTRS)  # a looser cap restores the capped rows
    assert dataset.read_dataset(tmp_path / "three").column("drop_reason").to_pylist().count("cell_cap") == 0


def test_pairs_isolate_one_attribute():
    """Pairs: chosen has the higher level of the attribute, other attributes equal, each sample used once."""
    rows = [row("a", i, f"resp {i}", h=h, s=s) for i, (h, s) in enumerate([(4, 2), (0, 2), (2, 2), (3, 1), (1, 3)])]
    rows.append(row("b", 0, "lonely", h=1, s=1))
    for r in rows:
        r["kept"] = True
    t = pa.Table.from_pylist(rows)
    pairs = make_pairs(t, "helpful", ATTRS)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("resp 0", "resp 1")]  # gap 4 first; resp 2 left alone
    assert pairs[0]["chosen_control"] == pairs[0]["control"] == {"helpful": 4, "harmless": 2}  # DPO conditions on it
    anyp = make_pairs(t, "helpful", ATTRS, others="any")
    assert [(p["chosen_id"], p["rejected_id"]) for p in anyp] == [("a/0/0", "a/1/0"), ("a/3/0", "a/4/0")]
    assert len(make_pairs(t, "helpful", ATTRS, others="any", max_per_prompt=1)) == 1
    with pytest.raises(ValueError, match="not an attribute"):
        make_pairs(t, "honest", ATTRS)


def _dataset_dir(tmp_path):
    out = tmp_path / "gen"
    rows = []
    for p in range(4):
        for i, (h, s) in enumerate([(0, 0), (4, 0), (2, 3), (2, 3)]):
            r = row(f"p{p}", i, f"prompt {p} answer number {i} " + "word " * i, h=h, s=s,
                    scores={"helpful": h - 2.0, "harmless": s - 2.0})
            r["kept"], r["drop_reason"] = True, None
            rows.append(r)
    _shards(out, rows, 8)
    dataset.write_json({"format": dataset.FORMAT, "status": "complete", "config": {},
                        "control_spec": {"attributes": list(ATTRS), "levels": 5},
                        "bins": {"levels": 5, "edges": {"helpful": [-1.5, -0.5, 0.5, 1.5], "harmless": [-1.5, -0.5, 0.5, 1.5]}}},
                       out / "manifest.json")
    return out


def test_distill_command_refilter_pairs_and_mix(tmp_path, capsys):
    """`ctrlsafe distill` re-applies rules with new options, writes TRL pairs, and mixes by category."""
    src = _dataset_dir(tmp_path)
    assert main(["distill", str(src), "--out", str(tmp_path / "floor"), "--harmless-floor", "1", "--cell-cap", "none"]) == 0
    m = json.loads((tmp_path / "floor" / "manifest.json").read_text())
    assert m["counts"]["samples"] == 16 and m["counts"]["kept"] == 8
    assert m["counts"]["drop_reasons"] == {"harmless_floor": 8}

    assert main(["distill", str(src), "--out", str(tmp_path / "pairs"), "--pairs", "helpful"]) == 0
    pairs = dataset.read_dataset(tmp_path / "pairs").to_pylist()
    assert len(pairs) == 4 and all(p["chosen_control"]["helpful"] == 4 and p["rejected_control"]["helpful"] == 0 for p in pairs)
    assert {"prompt", "chosen", "rejected", "control"} <= set(pairs[0])

    cats = tmp_path / "cats.jsonl"
    cats.write_text("".join(json.dumps({"id": f"p{p}", "category": "ehd" if p < 2 else "ihd"}) + "\n" for p in range(4)))
    assert main(["distill", str(src), "--out", str(tmp_path / "mix"), "--mix", "ehd=3,ihd=2", "--categories", str(cats)]) == 0
    mixed = dataset.read_dataset(tmp_path / "mix").to_pylist()
    assert sorted(r["category"] for r in mixed) == ["ehd"] * 3 + ["ihd"] * 2
    assert main(["distill", str(src), "--out", str(tmp_path / "mix"), "--mix", "ehd=1"]) == 2  # out not empty
    assert "not empty" in capsys.readouterr().err


def test_distill_refuses_a_non_dataset(tmp_path, capsys):
    """A directory without a manifest is named as such."""
    assert main(["distill", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# -- samples generated elsewhere (vLLM, TGI): score -> data set -> distill ------------------------------
SCORERS = '''
def words(prompts, responses):
    return [float(len(r.split())) + 0.01 * len(r) for r in responses]

def boom(prompts, responses):
    raise RuntimeError("scorer exploded")
'''


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "ext_scorers.py").write_text(SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "ext_scorers"


def _external_rows(n_prompts=6):
    """vLLM-style rows: several responses per prompt of different lengths, some prompts as chats."""
    rows = []
    for p in range(n_prompts):
        chat = p % 2 == 1
        for k in range(4):
            text = " ".join(f"w{p}x{k}y{j}" for j in range(1 + 4 * k + p % 3))
            rows.append({
                "prompt": None if chat else f"question number {p}",
                "messages": [{"role": "user", "content": f"chat question {p}"}] if chat else None,
                "response": text, "finish_reason": "stop",
            })
    return rows


def _write_parquet(path, rows):
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_external_parquet_score_then_pairs(tmp_path, scorer_module):
    """An external Parquet folder with no manifest goes through `score --out DIR` (a module:function
    scorer) and `distill --pairs`: every pair's chosen sample has the higher level (and the higher
    score) of the attribute, both sides come from the same prompt, and chats keep their messages."""
    src = tmp_path / "vllm"
    rows = _external_rows()
    _write_parquet(src / "part-0.parquet", rows[:12])
    _write_parquet(src / "part-1.parquet", rows[12:])
    scored = tmp_path / "scored"
    assert main(["score", "--data", str(src), "--rm", f"helpful={scorer_module}:words", "--levels", "3",
                 "--out", str(scored)]) == 0
    m = json.loads((scored / "manifest.json").read_text())
    assert m["status"] == "complete" and m["control_spec"] == {"attributes": ["helpful"], "levels": 3}
    assert len(m["bins"]["edges"]["helpful"]) == 2 and m["counts"]["samples"] == 24
    records = dataset.read_dataset(scored).to_pylist()
    assert len({r["id"] for r in records}) == 24 and len({r["prompt_id"] for r in records}) == 6
    assert all(json.loads(r["messages"])[0]["content"] == r["prompt"] for r in records if r["messages"])

    out = tmp_path / "pairs"
    assert main(["distill", str(scored), "--out", str(out), "--pairs", "helpful"]) == 0
    pairs = dataset.read_dataset(out).to_pylist()
    by_id = {r["id"]: r for r in records}
    assert pairs
    for p in pairs:
        chosen, rejected = by_id[p["chosen_id"]], by_id[p["rejected_id"]]
        assert p["chosen_control"]["helpful"] > p["rejected_control"]["helpful"]
        assert chosen["scores"]["helpful"] > rejected["scores"]["helpful"]
        assert chosen["prompt_id"] == rejected["prompt_id"] == p["prompt_id"] and chosen["kept"] and rejected["kept"]
        assert (p["chosen"], p["rejected"]) == (chosen["response"], rejected["response"])


def test_external_jsonl_given_scores_plain_distill_reasons(tmp_path, scorer_module):
    """Rows that already carry `scores` (here harmless) are levelled next to an --rm scorer; a plain
    `distill` of the score output drops by the documented rules, with reasons, and keeps the rest."""
    rows = _external_rows(4)
    for i, r in enumerate(rows):
        r["scores"] = {"harmless": float(i % 8)}
    rows[0]["response"] = "   "
    rows[1]["response"] = "go go go go go go go go go go go go"
    data = tmp_path / "tgi.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = tmp_path / "scored"
    assert main(["score", "--data", str(data), "--rm", f"helpful={scorer_module}:words", "--levels", "4",
                 "--no-distill", "--out", str(scored)]) == 0
    m = json.loads((scored / "manifest.json").read_text())
    assert m["control_spec"]["attributes"] == ["harmless", "helpful"] and m["counts"]["kept"] == 16
    out = tmp_path / "floor"
    assert main(["distill", str(scored), "--out", str(out), "--harmless-floor", "1", "--cell-cap", "none",
                 "--prompt-cell-cap", "0", "--edge-margin", "0"]) == 0
    got = dataset.read_dataset(out).to_pylist()
    reasons_ = {r["response"]: r["drop_reason"] for r in got}
    assert reasons_["   "] == "empty" and reasons_["go go go go go go go go go go go go"] == "repetitive"
    for r in got[2:]:
        assert r["drop_reason"] == ("harmless_floor" if r["control"]["harmless"] < 1 else None)
        assert r["kept"] == (r["drop_reason"] is None)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["kept"] == sum(r["kept"] for r in got) > 0 and set(counts["drop_reasons"]) == {"empty", "repetitive", "harmless_floor"}


def test_score_errors_name_file_row_and_columns(tmp_path, scorer_module, capsys):
    """A Parquet without `response` is reported with its file and the columns it has; a JSONL row
    without it, or with a bad given score, with file, line and field; distill on a bare file says
    how to make it a data set."""
    rm = ["--rm", f"helpful={scorer_module}:words"]
    bad = _write_parquet(tmp_path / "in" / "a.parquet", [{"prompt": "q", "answer": "a"}])
    assert main(["score", "--data", str(bad.parent), *rm, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: no 'response' column (columns: prompt, answer)" in err

    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" + json.dumps({"prompt": "q", "text": "a"}) + "\n")
    assert main(["score", "--data", str(j), *rm, "--out", str(tmp_path / "o2")]) == 2
    assert f"{j}:line 2: field 'response' must be a string, the row has none (fields: prompt, text)" in capsys.readouterr().err

    j.write_text(json.dumps({"prompt": "q", "response": "a", "scores": {"harmless": 1}}) + "\n"
                 + json.dumps({"prompt": "q", "response": "b", "scores": {"harmless": "high"}}) + "\n")
    assert main(["score", "--data", str(j), *rm, "--out", str(tmp_path / "o3")]) == 2
    assert f"{j}:line 2: field 'scores.harmless' is 'high', expected a number" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()

    assert main(["distill", str(j), "--out", str(tmp_path / "o4")]) == 2
    assert "ctrlsafe score --data" in capsys.readouterr().err


def test_score_output_shards_with_all_null_columns_load_as_one_dataset(tmp_path, scorer_module):
    """Score output shards where a column is null in a whole shard (messages of plain prompts,
    finish_reason) have one explicit schema, so plain pyarrow.dataset reads the folder; a .parquet
    file output types scores/levels explicitly and an all-null column as string, not Arrow null."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    rows = _external_rows(4)
    for r in rows[:8]:
        del r["finish_reason"]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = tmp_path / "scored"
    assert main(["score", "--data", str(data), "--rm", f"helpful={scorer_module}:words", "--levels", "3",
                 "--chunk-size", "1", "--out", str(scored)]) == 0
    shards = dataset.shard_files(scored)
    assert len(shards) == 4
    schemas = [pq.read_schema(s) for s in shards]
    assert all(s.equals(schemas[0]) for s in schemas) and schemas[0].equals(dataset.record_schema(["helpful"]))
    table = pads.dataset(str(scored / "data"), format="parquet").to_table()
    assert table.num_rows == 16 and table.column("messages").null_count == 8

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": "q", "response": f"r {i}", "note": None}) + "\n" for i in range(3)))
    noted = tmp_path / "noted.jsonl"
    noted.write_text("".join(json.dumps({"prompt": "q", "response": f"r {i}", "note": "n"}) + "\n" for i in range(3)))
    for src, dst in ((plain, a), (noted, b)):
        assert main(["score", "--data", str(src), "--rm", f"helpful={scorer_module}:words", "--out", str(dst)]) == 0
    assert pq.read_schema(a).equals(pq.read_schema(b))
    assert pads.dataset([str(a), str(b)], format="parquet").to_table().num_rows == 6


def test_failed_distill_out_is_reusable(tmp_path, capsys):
    """A distill that fails after writing a shard marks its manifest failed; the corrected command
    reuses that --out (stale shards removed), and so does one whose writer was killed; a finished
    --out is still refused."""
    import subprocess
    import sys

    src = _dataset_dir(tmp_path)
    good = dataset.shard_files(src)[1].read_bytes()
    dataset.shard_files(src)[1].write_bytes(b"not parquet")  # an exception in the second shard
    out = tmp_path / "pairs"
    cmd = ["distill", str(src), "--out", str(out), "--pairs", "helpful"]
    assert main(cmd) == 2
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and m["error"] and len(dataset.shard_files(out)) == 1
    capsys.readouterr()
    assert main(cmd + ["--pair-others", "any"]) == 2  # still broken input: fails again, same --out accepted
    assert "not empty" not in capsys.readouterr().err

    dataset.shard_files(src)[1].write_bytes(good)
    assert main(cmd) == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert len(dataset.read_dataset(out).to_pylist()) == 4

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / "killed"
    assert main(["distill", str(src), "--out", str(killed), "--harmless-floor", "1"]) == 0
    m = json.loads((killed / "manifest.json").read_text())
    m.update(status="running", writer={**m.get("writer", {}), "pid": dead.pid, "host": __import__("socket").gethostname()})
    (killed / "manifest.json").write_text(json.dumps(m))
    assert main(["distill", str(src), "--out", str(killed), "--harmless-floor", "2"]) == 0
    assert json.loads((killed / "manifest.json").read_text())["config"]["distill"]["harmless_floor"] == 2

    capsys.readouterr()
    assert main(cmd) == 2
    assert "not empty" in capsys.readouterr().err
