"""Property tests (hypothesis) of two formats: the DataComp subset writer/reader and the id joins.

Found by it: ``save_subset`` of an empty draw failed with a confusing message (``[]`` became float64);
``positions``' same-order shortcut maps a repeated id's second copy to its own row (now documented as the
row-aligned layout). Mutations checked: ``save_subset`` not sorting (the reader refuses its own file); dropping the repeats
of a uid drawn k times (the occurrence count differs); ``IdIndex`` keeping the last of repeated ids
(``first[:-1] = ...``); ``IdIndex`` without the equality check after the binary search (absent ids found);
``positions`` mapping absent ids to row 0 (``fill_null(0)``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
from hypothesis import given, settings, strategies as st

from flyt.data.input_scores import IdIndex, positions
from flyt.data.subset import array_to_uids, load_subset, save_subset

uids = st.text("0123456789abcdef", min_size=32, max_size=32)
ids = st.text("0123456789abcdefghijk_", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(uids, st.integers(0, 5), max_size=30))
def test_a_subset_holds_each_uid_as_often_as_drawn_in_datacomp_order(tmp_path_factory, drawn):
    path = tmp_path_factory.mktemp("subset") / "s.npy"
    rows = save_subset(path, list(drawn), list(drawn.values()))
    loaded = load_subset(path)
    assert rows == len(loaded) == sum(drawn.values())
    assert loaded.dtype == np.dtype("u8,u8")
    pairs = [(int(u[:16], 16), int(u[16:], 16)) for u, k in sorted(drawn.items()) for _ in range(k)]
    assert [tuple(map(int, row)) for row in loaded] == sorted(pairs)  # lexicographic on (f0, f1), as DataComp sorts
    assert Counter(array_to_uids(loaded).to_pylist()) == +Counter(drawn)


@settings(max_examples=80, deadline=None)
@given(st.lists(ids, max_size=40), st.lists(ids, max_size=40))
def test_both_joins_find_the_first_row_of_each_id_or_none(table, query):
    first = {}
    for row, value in enumerate(table):
        first.setdefault(value, row)
    expected = [first.get(q, -1) for q in query]
    values, asked = pa.array(table, pa.string()), pa.array(query, pa.string())
    assert IdIndex(values)(asked).tolist() == expected
    # positions' shortcut: a query identical to the table is its row-aligned file (row i -> row i)
    assert positions(values, asked).tolist() == (list(range(len(table))) if query == table else expected)
    assert positions(values, values).tolist() == list(range(len(table)))
