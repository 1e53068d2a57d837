import pytest

from common.errors import UserError
from obsdiff.patterns import ACCEPTED, Sparsity, parse_sparsity


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2:4", Sparsity("nm", 0.5, 2, 4)),
        (" 4:8 ", Sparsity("nm", 0.5, 4, 8)),
        ("unstructured:0.5", Sparsity("unstructured", 0.5)),
        ("structured:0.3", Sparsity("structured", 0.3)),
        ("DENSE", Sparsity("dense")),
    ],
)
def test_parse(text, expected):
    s = parse_sparsity(text)
    assert s == expected
    assert parse_sparsity(str(s)) == s  # canonical string round-trips


@pytest.mark.parametrize("bad", ["", "3:4", "2:8", "50%", "unstructured:1.5", "structured:0", "structured", "sparse:0.5"])
def test_bad_strings_list_accepted_forms(bad):
    with pytest.raises(UserError) as e:
        parse_sparsity(bad)
    assert ACCEPTED in str(e.value) and "\n" not in str(e.value)


def test_ids_are_path_safe():
    assert parse_sparsity("2:4").id == "2-4"
    assert parse_sparsity("structured:0.3").id == "structured-0.3"
    with pytest.raises(AttributeError):
        parse_sparsity("2:4").n = 3  # frozen
