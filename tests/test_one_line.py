from llmbatch.one_line import one_line


def test_one_line_joins_cuts_and_names():
    exc = ValueError("first  line\n\n  second\tline\n")
    assert one_line(exc) == "first line second line"
    assert one_line(exc, first_line=True) == "first line"
    assert one_line(exc, first_line=True, with_type=True) == "ValueError: first line"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(OSError("x" * 400)) == "x" * 297 + "..."
    assert one_line(OSError("\n\nlater"), first_line=True) == "later"
