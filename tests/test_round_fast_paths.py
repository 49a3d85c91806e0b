"""The round's cheaper steps keep its bits and its refusals.

A division by a power of two done as a product, the packing of whole
buckets in one C++ call, the split of a result into the leaves' views, the
quick test that donated leaves are apart, and the health read of a donated
round in a group of two as a sum: each is compared with the step it
replaces, on inputs chosen to break it (subnormals, infinities, NaN, odd
strides, empty and 0-d leaves, views of one tensor, sums that overflow).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import avgfn
from avgfn._round import buffers as _buffers
from avgfn._round import health as _health
from avgfn._round.buffers import Buffers, check_donatable
from avgfn._round.options import Round
from _groups import Pair


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    special = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.smallest_normal * 1.5, info.max, -info.max,
               float("inf"), float("-inf"), float("nan"), 1.0, -3.0, 1e-3]
    values = torch.tensor(special, dtype=torch.float64).to(dtype)
    g = torch.Generator().manual_seed(0)
    return torch.cat([values, (torch.randn(4096, generator=g, dtype=torch.float64) * 10).to(dtype)])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("by", [2, 4, 8, 64])
def test_a_product_by_the_reciprocal_of_a_power_of_two_has_the_bits_of_the_division(dtype, by):
    x = _edge_values(dtype)
    scale = _buffers._reciprocal(by)
    assert scale == 1.0 / by
    assert torch.equal(_bits(torch.mul(x, scale)), _bits(torch.div(x, by)))
    y = x.clone()
    y.mul_(scale)
    assert torch.equal(_bits(y), _bits(torch.div(x, by)))
    # into a narrower dtype, rounded once, as a narrower wire packs it
    if dtype == torch.float32:
        for wire in (torch.bfloat16, torch.float16):
            a, b = torch.empty_like(x, dtype=wire), torch.empty_like(x, dtype=wire)
            torch.mul(x, scale, out=a)
            torch.div(x, by, out=b)
            assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("by", [1, 3, 6, 12])
def test_other_divisors_keep_the_division(by):
    assert _buffers._reciprocal(by) is None


class _Group(Pair):
    """A group of ``size`` replicas whose peers hold this replica's values."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def divisor(self) -> int:
        return self.size

    def start_sum(self, tensor: torch.Tensor) -> Any:
        self.sums.append(tensor.numel())
        return avgfn.Done(tensor.mul_(self.size))


def _many_small() -> list[torch.Tensor]:
    return [_edge_values(torch.float32)[:1000], _edge_values(torch.float32)[1000:3100].reshape(-1, 7)[:, 1:5]]


def _one_large() -> list[torch.Tensor]:  # packed leaf by leaf, not with one cat
    return [torch.cat([_edge_values(torch.float32)] * 20)[: _buffers._SMALL + 5]]


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("make", [_many_small, _one_large])
def test_the_packed_buffer_holds_each_value_divided_as_torch_divides_it(size, make):
    leaves = make()
    buf, _ = Buffers(leaves, _Group(size), Round(), torch.float32, None, None).pack(
        [(i, 0, leaf.numel()) for i, leaf in enumerate(leaves)], 0
    )
    expected = torch.cat([leaf.reshape(-1) for leaf in leaves]) / size
    assert torch.equal(_bits(buf), _bits(expected))


def _odd_layouts() -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "transposed and strided": [r(7, 5).t(), r(4, 6, 3)[:, 2], r(40)[::3], r(2, 3, 4).permute(2, 0, 1), r(1)],
        "0-d and empty": [r(3, 2), torch.tensor(1.5), torch.empty(0), torch.empty(2, 0), r(5)],
        "one leaf": [r(3, 4, 5)],
        "mixed dtypes": [r(4, 3), r(6).double(), r(2, 2)],
    }


@pytest.mark.parametrize("case", list(_odd_layouts()))
def test_odd_layouts_come_back_as_torch_averages_them(case):
    leaves = _odd_layouts()[case]
    reduce = Pair()
    out = avgfn.average(list(leaves), reduce)
    copies = [leaf.clone() for leaf in leaves]
    for got, leaf, copy in zip(out, leaves, copies):
        assert got.shape == leaf.shape and got.dtype == leaf.dtype
        assert torch.equal(got, copy)  # the peers hold the same values: the mean is the value
    assert reduce.sums == [sum(leaf.numel() for leaf in leaves)]
    # the results are views of one buffer, shaped as the leaves, none aliasing an input
    ptrs = {leaf.data_ptr() for leaf in leaves if leaf.numel()}
    assert not any(got.data_ptr() in ptrs for got in out if got.numel())


def test_the_split_result_keeps_autograd_flags():
    leaves = [torch.randn(3, 4, requires_grad=True), torch.randn(5)]
    out = avgfn.average(leaves, Pair())
    assert out[0].requires_grad and not out[1].requires_grad and out[0].shape == (3, 4)


_FLAG_CASES = {
    "one leaf": [torch.ones(3)],
    "one dtype": [torch.ones(3, 2), torch.ones(4)],
    "mixed dtypes": [torch.ones(3), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float16)],
    "trainable and not": [torch.ones(3, requires_grad=True), torch.ones(2, dtype=torch.float64)],
}


@pytest.mark.parametrize("case", list(_FLAG_CASES))
@pytest.mark.parametrize(
    "rnd",
    [avgfn.Round(), avgfn.Round(donate=True), avgfn.Round(bucket_bytes=16), avgfn.Round(nonfinite="exclude")],
    ids=["pure", "donate", "buckets", "exclude"],
)
def test_a_reduce_whose_answer_requires_grad_does_not_change_the_leaves_autograd_flags(case, rnd):
    leaves = [t.clone().requires_grad_(t.requires_grad) for t in _FLAG_CASES[case]]
    if rnd.donate and any(t.requires_grad for t in leaves):
        pytest.skip("a leaf that requires grad cannot be donated")
    out = avgfn.average(leaves, lambda t: t.detach().clone().requires_grad_(True), round=rnd)
    assert [t.requires_grad for t in out] == [t.requires_grad for t in leaves]
    assert all(t.grad_fn is None for t in out)


def _named(i: int) -> str:
    return f"[{i}]"


def test_the_quick_test_of_donated_leaves_passes_what_is_apart():
    base = torch.zeros(100)
    leaves = [base[:40], base[40:], torch.zeros(3), torch.nn.Parameter(torch.zeros(2))]
    assert _buffers._apart(leaves)
    check_donatable(leaves, [True] * 4, _named)


@pytest.mark.parametrize(
    "leaves, selected, message",
    [
        (lambda b: [b, b[2:5]], [False, True], "share memory"),  # a selected view inside an unselected tensor
        (lambda b: [b[:10], b[20:30], b[5:25]], [True, False, False], "share memory"),  # not neighbours
        (lambda b: [b[:1].expand(4)], [True], "overlaps itself"),
    ],
)
def test_what_the_quick_test_does_not_pass_is_judged_exactly(leaves, selected, message):
    tensors = leaves(torch.zeros(50))
    assert not _buffers._apart(tensors)
    with pytest.raises(ValueError, match=message):
        check_donatable(tensors, selected, _named)


def test_unselected_leaves_may_share_memory():
    b = torch.zeros(50)
    tensors = [b, b[2:5], torch.zeros(4)]
    assert not _buffers._apart(tensors)
    check_donatable(tensors, [False, False, True], _named)  # the donated one is apart: no error


def test_an_empty_leaf_leaves_the_quick_test_to_the_exact_one():
    b = torch.zeros(10)
    tensors = [b, b[3:3]]
    assert not _buffers._apart(tensors)
    check_donatable(tensors, [True, True], _named)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_health_of_a_pair_read_as_a_sum(dtype):
    def health(*values: float) -> tuple[bool, bool]:
        return _health.local_health([torch.tensor(values, dtype=torch.float64).to(dtype)], None, None, pair=True)

    assert health(1.0, -2.0) == (True, True)
    assert health(1.0, float("nan")) == (False, False)
    assert health(float("inf"), 1.0) == (False, False)
    assert health(float("inf"), float("-inf")) == (False, False)
    big = torch.finfo(dtype).max
    # finite values whose sum overflows: finite, and with room (two halves cannot overflow)
    assert health(big, big, big) == (True, True)
    # outside a pair, the same values have no room
    assert _health.local_health([torch.tensor([big, big], dtype=torch.float64).to(dtype)], None, None) == (True, False)


def test_a_pair_s_health_read_of_other_dtypes_keeps_the_extremes():
    half = torch.tensor([60000.0, 1.0], dtype=torch.float16)
    assert _health.local_health([half], None, None, pair=True) == (True, False)
    z = torch.tensor([1 + 1j, float("nan")], dtype=torch.complex64)
    assert _health.local_health([z], None, None, pair=True)[0] is False


def test_a_pair_s_health_read_of_leaves_that_tile_one_storage():
    base = torch.ones(64)
    base[50] = float("nan")
    leaves = list(base.split([10, 30, 24]))
    assert _health.local_health(leaves, None, None, pair=True) == (False, False)
    assert _health.local_health(leaves[:2], None, None, pair=True) == (True, True)


class _PairInData(Pair):
    """A group of two whose rounds may carry their check in their data."""

    agree_in_data = True


@pytest.mark.parametrize("group, in_place", [(Pair, True), (_PairInData, False)])
def test_a_donated_round_runs_in_place_unless_its_check_can_travel_in_its_data(group, in_place):
    base = torch.randn(30)
    params = {"a": base[:10].view(2, 5), "b": base[10:]}  # they tile one storage
    snapshot = base.clone()
    out = avgfn.average(params, group(), round=avgfn.Round(donate=True))
    assert (out["a"].data_ptr() == base.data_ptr()) is in_place
    assert torch.equal(base, snapshot)  # the peers hold the same values: the mean is the value
    if not in_place:  # a fresh buffer: the donated memory is not needed and was not written
        assert out["b"].data_ptr() != base[10:].data_ptr()


def test_a_donated_round_larger_than_the_limit_stays_in_place():
    from avgfn._round import predicted

    base = torch.ones(predicted.LIMIT + 1)
    out = avgfn.average([base], _PairInData(), round=avgfn.Round(donate=True))
    assert out[0] is base
