"""seqshape: which dimensions are the sequence, found by shapes (the helper ``prune`` plans with)."""

from era_compile.passes.seqshape import _view_groups


def test_view_groups():
    assert _view_groups((1, 43, 64), (1, 43, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert _view_groups((1, 4, 43, 16), (1, 4, 688)) == [([0], [0]), ([1], [1]), ([2, 3], [2])]
    assert _view_groups((1, 43, 64), (43, 64)) == [([0, 1], [0]), ([2], [1])]
