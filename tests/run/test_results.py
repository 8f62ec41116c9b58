import json

import h5py
import numpy as np
import pytest

from rshard_hpc.dist.topology import check_layout
from rshard_hpc.errors import InputError
from rshard_hpc.run.prompts import id_key, read_prompts
from rshard_hpc.run.results import ROW_DATASETS, ResultWriter


def test_jsonl_ids_default_to_line_numbers(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b", "id": "x"}\n')
    prompts = read_prompts(p)
    assert [(q.id, q.text, q.line) for q in prompts] == [(1, "a", 1), ("x", "b", 3)]


def test_plain_text_and_its_errors(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("first prompt\nsecond prompt\n")
    assert [q.text for q in read_prompts(p)] == ["first prompt", "second prompt"]
    p.write_text("first\n\nthird\n")
    with pytest.raises(InputError, match="p.txt:2: empty prompt"):
        read_prompts(p)
    p.write_text("")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(p)


def test_ids_keep_their_type_and_repeats_are_refused(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": "1"}\n')
    assert [q.id for q in read_prompts(p)] == [1, "1"]  # an integer and a string: two ids
    assert [id_key(q.id) for q in read_prompts(p)] == ["1", '"1"']
    p.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": 1}\n')
    with pytest.raises(InputError, match="p.jsonl:2: id 1 repeats the id of line 1"):
        read_prompts(p)


@pytest.mark.parametrize("bad", ["null", "true", "{}", "[1]", "1.5"])
def test_ids_other_than_strings_and_integers_are_refused(tmp_path, bad):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a", "id": "ok"}\n{"text": "b", "id": %s}\n' % bad)
    with pytest.raises(InputError, match=r'p.jsonl:2: "id" must be a string or an integer'):
        read_prompts(p)


def test_layout_error_names_formula():
    check_layout(2, 2, 7)
    with pytest.raises(InputError, match=r"1 \+ alpha \+ beta\^2 = 1 \+ 3 \+ 4 = 8"):
        check_layout(3, 2, 7)


@pytest.mark.parametrize("task", ["embed", "generate"])
def test_resume_drops_the_rows_of_a_batch_cut_short(tmp_path, task):
    """Rows go in before their ids (the commit): a crash between leaves rows past len(ids), which --resume drops,
    so those prompts are computed again; an older file with ids past its rows is cut the same way."""
    path, attrs, fp = tmp_path / "r.h5", {"model": "m", "task": task}, {"task": task}
    writer = ResultWriter(path, attrs, fp)
    if task == "embed":
        writer.append_embeddings(["a", "b"], np.ones((2, 4), np.float32))
    else:
        writer.append_generated(["a", "b"], [[1, 2], [3]], ["x", "y"])
    rows = "embeddings" if task == "embed" else "generated/text"
    with h5py.File(path, "a") as f:  # a batch of 3 rows whose ids never went in
        f[rows].resize(5, axis=0)
    writer.close()
    resumed = ResultWriter(path, attrs, fp, resume=True)
    assert resumed.done_ids == {"a", "b"} and resumed.unfinished_rows == 3
    resumed.close()
    with h5py.File(path, "r") as f:
        present = [name for name in ("ids",) + ROW_DATASETS if name in f]
        assert len(present) == (2 if task == "embed" else 3)
        assert all(f[name].shape[0] == 2 for name in present)
    with h5py.File(path, "a") as f:  # ids (and their types) past the rows: cut the same way
        for name in ("ids", "id_is_int"):
            f[name].resize(3, axis=0)
        f["ids"][2] = "c"
    again = ResultWriter(path, attrs, fp, resume=True)
    assert again.done_ids == {"a", "b"} and again.unfinished_rows == 1
    again.close()
    last = ResultWriter(path, attrs, fp, resume=True)
    assert last.unfinished_rows == 0
    last.close()


def test_out_in_a_folder_that_does_not_exist_yet(tmp_path):
    out = tmp_path / "results" / "deeper" / "r.h5"
    writer = ResultWriter(out, {"task": "embed"}, {"task": "embed"})
    writer.append_embeddings([1, "b"], np.ones((2, 3), np.float32))
    writer.close()
    with h5py.File(out, "r") as f:
        assert list(f["ids"][()]) == [b"1", b"b"] and list(f["id_is_int"][()]) == [1, 0]
    assert not (out.parent / "r.h5.lock").exists()


def test_a_full_disk_during_a_report_leaves_the_old_report_whole(tmp_path, monkeypatch):
    """The end-of-run reports are written beside the old ones and swapped in: a write that fails for want of
    space (here injected) says so plainly, leaves the old /privacy/json readable and no half-written copy."""
    import errno

    from rshard_hpc.run import results

    out = tmp_path / "r.h5"
    writer = ResultWriter(out, {"task": "embed"}, {"task": "embed"})
    writer.append_embeddings(["a"], np.ones((1, 3), np.float32))
    writer.write_json("privacy", {"run": 1})
    real = results._replace

    def full(group, key, create):
        def failing(g, name):
            create(g, name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(group, key, failing)

    monkeypatch.setattr(results, "_replace", full)
    with pytest.raises(results.DiskFull, match=r"disk full while writing .*: 1 prompts are in .*--resume"):
        writer.write_json("privacy", {"run": 2})
    writer.close()
    with h5py.File(out, "r") as f:
        assert json.loads(f["privacy/json"][()]) == {"run": 1} and list(f["privacy"]) == ["json"]
