"""Pieces, row splits, layouts: the mapping from engine tensors to parameter coordinates."""
import pytest
import torch

import mlorc_dist
from mlorc_dist.engines.fsdp2 import _shard0_row_range
from mlorc_dist.pieces import Layout, MatrixSpec, Piece, row_split


@pytest.mark.parametrize("start,stop,cols,expect", [
    (0, 12, 4, (0, 0, 3, 0)),          # whole rows
    (2, 12, 4, (2, 1, 2, 0)),          # head of 2, rows 1-2
    (2, 11, 4, (2, 1, 1, 3)),          # head, one row, tail of 3
    (5, 7, 4, (2, 2, 0, 0)),           # inside one row
    (4, 4, 4, (0, 1, 0, 0)),           # empty
    (3, 5, 4, (1, 1, 0, 1)),           # across one row boundary, no whole row
])
def test_row_split(start, stop, cols, expect):
    split = row_split(start, stop, cols)
    assert (split.head, split.body_row0, split.body_rows, split.tail) == expect
    assert split.head + split.body_numel + split.tail == stop - start


def test_piece_rows_touched():
    spec = MatrixSpec("w", (5, 4), True)
    assert Piece(spec, 2, 11, 0).row_count == 3 and Piece(spec, 2, 11, 0).first_row == 0
    assert Piece(spec, 4, 8, 0).row_count == 1
    assert Piece(spec, 4, 4, 0).row_count == 0
    with pytest.raises(ValueError, match="outside"):
        Piece(spec, 0, 21, 0)


def test_layout_must_cover_the_partition():
    spec = MatrixSpec("w", (5, 4), True)
    ok = Layout([Piece(spec, 0, 8, 0), Piece(spec, 8, 20, 10)], [spec], padding=[(8, 2), (22, 2)])
    ok.validate(24)
    with pytest.raises(ValueError, match="does not cover"):
        Layout([Piece(spec, 0, 8, 0)], [spec]).validate(10)
    with pytest.raises(ValueError, match="uncovered or overlapping"):
        Layout([Piece(spec, 0, 8, 0), Piece(spec, 8, 12, 6)], [spec]).validate(10)
    with pytest.raises(ValueError, match="not listed"):
        Layout([Piece(spec, 0, 20, 0)], []).validate(20)


def test_attach_layout_rejects_a_layout_that_does_not_cover_the_tensor():
    flat = torch.zeros(30, requires_grad=True)
    opt = mlorc_dist.MLorcAdamW([torch.zeros(3, requires_grad=True)])
    spec = MatrixSpec("w", (5, 4), True)
    with pytest.raises(ValueError, match="does not cover"):
        opt.attach_layout(flat, Layout([Piece(spec, 0, 20, 0)], [spec]))


@pytest.mark.parametrize("rows,world,expect", [
    (31, 2, [(0, 16), (16, 31)]), (5, 4, [(0, 2), (2, 4), (4, 5), (5, 5)]), (2, 3, [(0, 1), (1, 2), (2, 2)]),
])
def test_fsdp2_row_ranges_follow_torch_chunk(rows, world, expect):
    got = [_shard0_row_range(rows, world, r) for r in range(world)]
    assert got == expect
    chunks = torch.arange(rows).chunk(world)
    assert [len(c) for c in chunks] + [0] * (world - len(chunks)) == [b - a for a, b in got]


def test_global_scope_refuses_two_pieces_of_one_matrix_on_one_rank():
    """Contiguous partitions never give a rank two pieces of one matrix; a layout that does is
    refused rather than half-handled."""
    cut = torch.randn(7, 5, requires_grad=True)
    opt = mlorc_dist.MLorcAdamW([cut], rank=2, scope="global")
    spec = MatrixSpec("param0", (7, 5), True)
    opt.attach_layout(cut, Layout([Piece(spec, 0, 13, 0), Piece(spec, 13, 35, 13)], [spec]))
    cut.grad = torch.randn(7, 5)
    with pytest.raises(ValueError, match="at most one piece"):
        opt.step()


def test_several_cuts_in_one_tensor_local_scope_compress_each_body():
    torch.manual_seed(0)
    cut = torch.randn(7, 5, requires_grad=True)
    opt = mlorc_dist.MLorcAdamW([cut], rank=2, scope="local", dense_when_no_saving=False)
    spec = MatrixSpec("param0", (7, 5), True)
    opt.attach_layout(cut, Layout([Piece(spec, 0, 13, 0), Piece(spec, 13, 35, 13)], [spec]))
    cut.grad = torch.randn(7, 5)
    opt.step()
    first, second = opt.state[cut]["pieces"]
    assert first["exp_avg_u"].shape == (2, 2) and "head_exp_avg" not in first
    assert first["tail_exp_avg"].shape == (3,)          # 13 = 2 rows of 5 + 3
    assert second["head_exp_avg"].shape == (2,) and second["exp_avg_u"].shape == (4, 2)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_an_empty_shard_steps_without_state_or_error(scope):
    """FSDP2 gives ranks past the last row an empty local tensor (more ranks than rows)."""
    empty = torch.zeros(0, 5, requires_grad=True)
    empty.grad = torch.zeros(0, 5)
    opt = mlorc_dist.MLorcAdamW([empty], rank=2, scope=scope, dense_when_no_saving=False)
    spec = MatrixSpec("param0", (2, 5), True)
    opt.attach_layout(empty, Layout([Piece(spec, 10, 10, 0)], [spec]))
    opt.step()
    opt.step()
    assert opt.state[empty]["step"] == 2
    assert all(t.numel() == 0 or name.endswith(("_s", "_vh"))
               for entry in opt.state[empty]["pieces"] for name, t in entry.items() if torch.is_tensor(t))
