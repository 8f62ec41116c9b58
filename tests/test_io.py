import pytest

from rshard_hpc.errors import InputError
from rshard_hpc.io import read_prompts
from rshard_hpc.topology import check_layout


def test_jsonl_ids_default_to_line_numbers(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b", "id": "x"}\n')
    prompts = read_prompts(p)
    assert [(q.id, q.text, q.line) for q in prompts] == [("1", "a", 1), ("x", "b", 3)]


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


def test_duplicate_ids(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": "1"}\n')
    with pytest.raises(InputError, match="repeats"):
        read_prompts(p)


def test_layout_error_names_formula():
    check_layout(2, 2, 7)
    with pytest.raises(InputError, match=r"1 \+ alpha \+ beta\^2 = 1 \+ 3 \+ 4 = 8"):
        check_layout(3, 2, 7)
