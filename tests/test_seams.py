"""The seams of a round, in one process: what the averagers refuse, and what they say.

Fakes stand in for the group (a plain Reduce, or an :class:`avgfn.ForwardingReduce`
subclass where the round must see a group-backed Reduce); only the checks of
``collectives`` itself use a real one-rank gloo group. The two-process versions
(replicas that disagree, a wire overflow on gloo) are ``test_seams_gloo.py``.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist

import avgfn
from avgfn.collectives import GroupMean
from avgfn.testing import RecordingReduce, peers_mean

R = lambda t: t  # noqa: E731  (the Reduce of a group of one)
HALF = lambda t: t.mul_(0.5)  # noqa: E731  (a group of two whose peer holds zeros)
MAX_TIMEOUT_S = (2**31 - 1) / 1000  # the longest timeout gloo waits for as asked


def _params():
    return {"a": torch.ones(3), "b": torch.full((2,), 2.0)}


def _clone(tree):
    return {k: v.clone() for k, v in tree.items()}


def _same(tree, before):
    return all(torch.equal(tree[k], before[k]) for k in before)


# --- params that are not a pytree of tensors -----------------------------------------

NAMED = "dict(model.named_parameters())"


def _periodic_update(params):
    avg = avgfn.periodic(2, reduce=R)
    return avg.update(params, avg.init(_params()), 0)


_GENERATOR_CALLS = {
    "average": lambda gen: avgfn.average(gen, R),
    "periodic.init": lambda gen: avgfn.periodic(2, reduce=R).init(gen),
    "periodic.update": _periodic_update,
    "diloco.init": lambda gen: avgfn.diloco(2, reduce=R).init(gen),
    "ema.init": lambda gen: avgfn.ema(0.9).init(gen),
}


@pytest.mark.parametrize("call", sorted(_GENERATOR_CALLS))
def test_a_generator_of_params_is_refused_with_the_spelling_to_use(call):
    model = torch.nn.Linear(2, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match=re.escape(NAMED)) as info:
        _GENERATOR_CALLS[call](model.parameters())
    assert "generator" in str(info.value)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


_NO_TENSOR_CALLS = {
    "average": lambda tree: avgfn.average(tree, R),
    "periodic.init": lambda tree: avgfn.periodic(2, reduce=R).init(tree),
    "diloco.init": lambda tree: avgfn.diloco(2, reduce=R).init(tree),
    "ema.init": lambda tree: avgfn.ema(0.9).init(tree),
}


def _due_update(make, step=1):
    """An update at a due step (``step``) with a state made for tensors."""

    def call(tree):
        avg = make()
        return avg.update(tree, avg.init(_params()), step)

    return call


_NO_TENSOR_CALLS.update({
    "periodic.update": _due_update(lambda: avgfn.periodic(2, reduce=R), step=2),
    "hierarchical.update": _due_update(lambda: avgfn.hierarchical([(2, R)]), step=2),
    "diloco.update": _due_update(lambda: avgfn.diloco(2, reduce=R)),
    "overlapped_diloco.update": _due_update(lambda: avgfn.overlapped_diloco(2, reduce=R, eager=False)),
    "streaming_diloco.update": _due_update(lambda: avgfn.streaming_diloco(2, reduce=R)),
    "slowmo.update": _due_update(lambda: avgfn.slowmo(2, reduce=R, lr=0.1)),
    "weighted.update": _due_update(lambda: avgfn.weighted(2, reduce=R, weight=1.0), step=2),
})


@pytest.mark.parametrize("tree", [{"n": 3}, {}, None, [1.0, "x"]], ids=["numbers", "empty", "none", "list"])
@pytest.mark.parametrize("call", sorted(_NO_TENSOR_CALLS))
def test_a_tree_without_a_tensor_is_refused(call, tree):
    with pytest.raises(TypeError, match="no tensor to average"):
        _NO_TENSOR_CALLS[call](tree)


# --- donation of tensors that share memory -------------------------------------------

def _donate():
    return avgfn.Round(donate=True)


def test_donation_refuses_a_selected_view_inside_an_unselected_tensor():
    base = torch.ones(10)
    params = {"big": base, "view": base[3:5]}
    with pytest.raises(ValueError, match="share memory") as info:
        avgfn.average(params, HALF, where={"big": False, "view": True}, round=_donate())
    assert "['big']" in str(info.value) and "['view']" in str(info.value)
    assert torch.equal(base, torch.ones(10))


def test_donation_compares_every_open_span_not_only_the_neighbour():
    # Sorted by start: big [0, 10), short [1, 2), sel [5, 7). sel's neighbour
    # (short) ends before it; only big, two spans back, overlaps it.
    base = torch.ones(10)
    params = {"big": base, "short": base[1:2], "sel": base[5:7]}
    where = {"big": False, "short": False, "sel": True}
    with pytest.raises(ValueError, match="share memory") as info:
        avgfn.average(params, HALF, where=where, round=_donate())
    assert "['big']" in str(info.value) and "['sel']" in str(info.value)
    assert torch.equal(base, torch.ones(10))


def test_donation_of_disjoint_views_of_one_storage_still_averages_in_place():
    base = torch.ones(10)
    params = {"x": base[:4], "y": base[4:]}
    out = avgfn.average(params, HALF, round=_donate())
    assert out["x"] is params["x"] and torch.equal(base, torch.full((10,), 0.5))


# --- a value past the range of the wire dtype ----------------------------------------

FP16 = {"comm_dtype": torch.float16}


@pytest.mark.parametrize(
    "options",
    [
        {"donate": True},
        {"donate": True, "nonfinite": "exclude"},  # a group of one: no healthy replica is left
        {"donate": False},
    ],
    ids=["donate", "donate-exclude", "no-donation"],
)
def test_a_wire_overflow_raises_and_leaves_the_tensor_unchanged(options):
    params = {"w": torch.full((4,), 1e6)}  # finite, but past float16's 65504
    with pytest.raises(avgfn.NonFiniteError) as info:
        avgfn.average(params, R, round=avgfn.Round(**FP16, **options))
    assert info.value.paths == ("['w']",)
    assert torch.equal(params["w"], torch.full((4,), 1e6))


@pytest.mark.parametrize("nonfinite", ["raise", "exclude"])
def test_a_bucketed_donated_round_never_writes_the_overflow(nonfinite):
    params = {"w": torch.full((4,), 1e6), "v": torch.full((8,), 3.0)}
    seen = []

    def reduce(t):
        seen.append({k: v.clone() for k, v in params.items()})  # what the params hold mid-round
        return t

    rnd = avgfn.Round(**FP16, donate=True, bucket_bytes=16, nonfinite=nonfinite)
    with pytest.raises(avgfn.NonFiniteError):
        avgfn.average(params, reduce, round=rnd)
    assert all(torch.isfinite(v).all() for snapshot in seen for v in snapshot.values())
    assert torch.equal(params["w"], torch.full((4,), 1e6)) and torch.equal(params["v"], torch.full((8,), 3.0))


# --- a peer failure during a donated round --------------------------------------------

UNCHANGED = "The params and state passed to update are unchanged."


class _DeadPeer(avgfn.ForwardingReduce):
    """A group-backed Reduce whose data collective fails as a dead peer makes it fail."""

    def _fail(self):
        return avgfn.PeerError(
            f"all_reduce_mean over g failed after 1.00s: a peer died. {UNCHANGED} Cause: test",
            group="g",
            timeout=1.0,
        )

    def start(self, tensor):
        raise self._fail()

    def start_sum(self, tensor):
        raise self._fail()


def _round_with_dead_peer(how, donate):
    params = {"w": torch.ones(4)}
    rnd = avgfn.Round(donate=donate)
    reduce = _DeadPeer(R)
    with pytest.raises(avgfn.PeerError) as info:
        if how == "average":
            avgfn.average(params, reduce, round=rnd)
        else:
            avg = avgfn.periodic(2, reduce=reduce, round=rnd)
            avg.update(params, avg.init(params), 0)
    return info.value


@pytest.mark.parametrize("how", ["average", "periodic"])
def test_a_peer_failure_in_a_donated_round_says_the_params_may_be_mixed(how):
    error = _round_with_dead_peer(how, donate=True)
    message = str(error)
    assert UNCHANGED not in message and "are unchanged" not in message
    assert "may hold a mix" in message and "checkpoint" in message
    assert error.group == "g" and error.timeout == 1.0


@pytest.mark.parametrize("how", ["average", "periodic"])
def test_a_peer_failure_without_donation_says_the_params_are_unchanged(how):
    message = str(_round_with_dead_peer(how, donate=False))
    assert UNCHANGED in message and "may hold a mix" not in message


# --- NonFiniteError.paths names params in the outer steps -----------------------------

_OUTER = {
    "diloco": lambda: avgfn.diloco(2, reduce=R),
    "streaming_diloco": lambda: avgfn.streaming_diloco(2, reduce=R, num_fragments=1),
    "slowmo": lambda: avgfn.slowmo(2, reduce=R, lr=0.1),
}


@pytest.mark.parametrize("name", sorted(_OUTER))
def test_nonfinite_error_of_an_outer_step_names_the_param(name):
    avg = _OUTER[name]()
    state = avg.init({"a": torch.ones(3), "b": torch.ones(2)})
    params = {"a": torch.ones(3), "b": torch.tensor([1.0, math.nan])}
    before = _clone(params)
    with pytest.raises(avgfn.NonFiniteError) as info:
        avg.update(params, state, 1)
    assert info.value.paths == ("['b']",)
    assert torch.equal(params["a"], before["a"]) and torch.isnan(params["b"][1])


# --- inputs a round refuses -----------------------------------------------------------


def test_a_complex_leaf_on_a_real_wire_is_refused_naming_it():
    params = {"w": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}
    rnd = avgfn.Round(comm_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=re.escape("complex leaf at ['z']")):
        avgfn.average(params, R, where={"w": True, "z": True}, round=rnd)
    avg = avgfn.periodic(2, reduce=R, where=lambda leaf: True, round=rnd)
    with pytest.raises(TypeError, match=re.escape("complex leaf at ['z']")):
        avg.update(params, avg.init(params), 0)


@pytest.mark.parametrize(
    "reduce,what",
    [
        (lambda t: t.to(torch.int64), "torch.int64"),
        (lambda t: torch.empty_like(t, device="meta"), "meta"),
    ],
    ids=["dtype", "device"],
)
def test_a_reduce_result_of_another_dtype_or_device_is_refused(reduce, what):
    params = _params()
    before = _clone(params)
    with pytest.raises(TypeError, match="must return a tensor of its input's dtype and device") as info:
        avgfn.average(params, reduce)
    assert what in str(info.value)
    assert _same(params, before)


class _Shaped:
    """Not a tensor, though it has a tensor's ``shape``."""

    shape = (3,)


_ROUNDS = {
    "default": avgfn.Round(),
    "donate": avgfn.Round(donate=True),
    "exclude": avgfn.Round(nonfinite="exclude"),
    "donate-bucketed": avgfn.Round(donate=True, bucket_bytes=64),
}


@pytest.mark.parametrize("rnd", list(_ROUNDS.values()), ids=list(_ROUNDS))
@pytest.mark.parametrize(
    "reduce,error,match",
    [
        (lambda t: t.tolist(), TypeError, "reduce must return a Tensor, got list"),
        (lambda t: _Shaped(), TypeError, "reduce must return a Tensor, got _Shaped"),
        (lambda t: torch.empty_like(t, device="meta"), TypeError, "dtype and device"),
        (lambda t: t.to(torch.int64), TypeError, "dtype and device"),
        (lambda t: t[:1], ValueError, "shaped like its input"),
        (lambda t: t[:1].clone().expand(t.shape), TypeError, "contiguous tensor"),
        (lambda t: torch.stack([t, t], 1)[:, 0], TypeError, "contiguous tensor"),
        (lambda t: t.to_sparse(), TypeError, "dense"),
    ],
    ids=["list", "shaped", "meta", "int", "short", "expanded", "strided", "sparse"],
)
def test_every_round_refuses_a_reduce_result_that_is_not_a_tensor_like_its_input(rnd, reduce, error, match):
    # the health flags' collective (donated and excluding rounds) checks its result as the data's does
    params = _params()
    before = _clone(params)
    with pytest.raises(error, match=match):
        avgfn.average(params, reduce, round=rnd)
    assert _same(params, before)


@pytest.mark.parametrize("algo", ["weighted", "fedavg"])
@pytest.mark.parametrize(
    "reduce,error,match",
    [
        (lambda t: t.tolist(), TypeError, "reduce must return a Tensor, got list"),
        (lambda t: _Shaped(), TypeError, "reduce must return a Tensor, got _Shaped"),
        (lambda t: torch.empty_like(t, device="meta"), TypeError, "dtype and device"),
    ],
    ids=["list", "shaped", "meta"],
)
def test_the_weights_round_refuses_a_reduce_result_that_is_not_a_tensor_like_its_input(algo, reduce, error, match):
    avg = getattr(avgfn, algo)(1, reduce=reduce, weight=2.0)
    params = _params()
    state = avg.init(params)
    before = _clone(params)
    with pytest.raises(error, match=match):
        avg.update(params, state, 0)
    assert _same(params, before)


def test_a_hierarchical_state_of_other_levels_is_refused():
    two = avgfn.hierarchical([(1, R), (2, R)])
    three = avgfn.hierarchical([(1, R), (2, R), (4, R)])
    params = _params()
    with pytest.raises(ValueError, match="2 levels but this averager has 3"):
        three.update(params, two.init(params), 4)


def test_error_feedback_refuses_a_state_without_the_residual():
    params = _params()
    feedback = avgfn.Round(comm_dtype=torch.bfloat16, error_feedback=True)
    avg = avgfn.periodic(2, reduce=R, round=feedback)
    with pytest.raises(ValueError, match="no error-feedback residual"):
        avg.update(params, avgfn.periodic(2, reduce=R).init(params), 0)


# --- timeouts the backend cannot honour -----------------------------------------------


@pytest.mark.parametrize(
    "timeout,why",
    [
        (math.inf, "finite"),
        (math.nan, "finite"),
        (10**400, "finite"),  # an int past the range of a float
        (1e300, "at most"),
        (MAX_TIMEOUT_S + 0.001, "at most"),
        (datetime.timedelta.max, "at most"),
        (datetime.timedelta(days=25), "at most"),
        (0, "> 0"),
        (-1.0, "> 0"),
    ],
    ids=["inf", "nan", "huge-int", "1e300", "just-past", "timedelta.max", "25-days", "zero", "negative"],
)
def test_a_timeout_that_cannot_be_honoured_is_refused_naming_it(timeout, why):
    for build in (
        lambda: avgfn.collectives.all_reduce_mean(timeout=timeout),
        lambda: avgfn.collectives.hierarchy([(2, 1)], timeout=timeout),
        lambda: GroupMean(None, timeout),
    ):
        with pytest.raises(ValueError, match="timeout") as info:
            build()
        assert why in str(info.value)
        assert repr(timeout)[:40] in str(info.value)


def test_the_largest_timeout_is_2_31_milliseconds():
    assert avgfn.collectives.MAX_TIMEOUT_S == MAX_TIMEOUT_S
    assert avgfn.collectives.all_reduce_mean(timeout=MAX_TIMEOUT_S).timeout == MAX_TIMEOUT_S
    exact = datetime.timedelta(milliseconds=2**31 - 1)
    assert avgfn.collectives.all_reduce_mean(timeout=exact).timeout == MAX_TIMEOUT_S


@pytest.fixture
def gloo_of_one():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(
            "gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_the_largest_timeout_waits_on_gloo(gloo_of_one):
    for timeout in (MAX_TIMEOUT_S, datetime.timedelta(milliseconds=2**31 - 1)):
        reduce = avgfn.collectives.all_reduce_mean(timeout=timeout)
        out = avgfn.average({"w": torch.tensor([1.0, 3.0])}, reduce)
        assert torch.equal(out["w"], torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="timeout must be a finite"):
        avgfn.collectives.all_reduce_mean(timeout=math.inf)


@pytest.mark.parametrize("timeout", [1e-4, 0.0009, datetime.timedelta(microseconds=500)])
def test_a_timeout_under_a_millisecond_is_refused(timeout):
    # a timedelta of 0.5 ms reaches the backend as 0 ms, which it reads as "no timeout":
    # a round would wait for a stalled peer for the group's own timeout
    with pytest.raises(ValueError, match="timeout must be at least 0.001 seconds"):
        avgfn.collectives.all_reduce_mean(timeout=timeout)
    assert avgfn.collectives.all_reduce_mean(timeout=0.001).timeout == 0.001


# --- avgfn.Round ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,exc,name",
    [
        ({"donate": "yes"}, TypeError, "donate"),
        ({"bucket_bytes": 8}, ValueError, "bucket_bytes"),
        ({"comm_dtype": torch.int8}, TypeError, "comm_dtype"),
        ({"error_feedback": True}, ValueError, "error_feedback"),
        ({"nonfinite": "drop"}, ValueError, "nonfinite"),
        ({"verify": "bytes"}, ValueError, "verify"),
        ({"agree": 1}, TypeError, "agree"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_round_refuses_a_bad_option_naming_it(options, exc, name):
    with pytest.raises(exc, match=rf"^Round: {name}") as info:
        avgfn.Round(**options)
    value = next(iter(options.values()))
    if name != "error_feedback":
        assert repr(value) in str(info.value)


def test_the_keyword_spelling_of_a_round_option_warns_and_works():
    with pytest.warns(DeprecationWarning, match=re.escape("avgfn.Round(donate=True)")):
        avg = avgfn.periodic(2, reduce=HALF, donate=True)
    params = {"w": torch.ones(4)}
    out, _ = avg.update(params, avg.init(params), 0)
    assert out["w"] is params["w"] and torch.equal(params["w"], torch.full((4,), 0.5))


def test_round_and_a_keyword_option_are_not_mixed():
    with pytest.raises(TypeError, match=r"round=avgfn\.Round\(\.\.\.\) only.*donate"):
        avgfn.periodic(2, reduce=R, round=avgfn.Round(), donate=True)


def test_an_option_the_averager_does_not_honour_is_refused_naming_it():
    with pytest.raises(ValueError, match=re.escape("donate=True is not supported")):
        avgfn.diloco(2, reduce=R, round=avgfn.Round(donate=True))


# --- the per-round agreement ------------------------------------------------------------


class _Agreements(avgfn.ForwardingReduce):
    """Records each agreement the round asks of the group (and agrees)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls = []

    def agree(self, digest, entries):
        self.calls.append((digest, entries))
        super().agree(digest, entries)


def test_each_round_agrees_once_through_the_reduce_with_its_step():
    reduce = _Agreements(R)
    avg = avgfn.periodic(2, reduce=reduce)
    params = _params()
    state = avg.init(params)
    reduce.calls.clear()  # init's check of the structure
    _, state = avg.update(params, state, 4)
    assert len(reduce.calls) == 1
    entries = reduce.calls[0][1]()
    assert entries[0] == ("<step>", "4")
    assert entries[1] == (
        "<round>",
        "averages=params of periodic, comm_dtype=None, bucket_bytes=None, health flag=False, devices=1, donate=False, "
        "in flight=False, nonfinite=raise, error_feedback=False",
    )
    assert [path for path, _ in entries[2:]] == ["['a']", "['b']"]
    reduce.calls.clear()
    avg.update(params, state, 5)  # an off-step
    assert reduce.calls == []


def test_the_agreements_differ_between_steps():
    reduce = _Agreements(R)
    avg = avgfn.periodic(2, reduce=reduce, round=avgfn.Round(verify=None))
    params = _params()
    state = avg.init(params)
    avg.update(params, state, 4)
    avg.update(params, state, 6)
    assert len(reduce.calls) == 2 and reduce.calls[0][0] != reduce.calls[1][0]


def test_round_agree_false_turns_the_agreement_off():
    reduce = _Agreements(R)
    avg = avgfn.periodic(2, reduce=reduce, round=avgfn.Round(agree=False))
    params = _params()
    state = avg.init(params)
    reduce.calls.clear()
    avg.update(params, state, 4)
    assert reduce.calls == []


# --- ModuleAverager and donation --------------------------------------------------------


def test_module_averager_reports_a_donated_round_as_a_change():
    model = torch.nn.Linear(3, 1, bias=False)  # one param: the donated round runs in place
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # period 1 warns as torch does
        avg = avgfn.ModuleAverager(model, avgfn.periodic(1, reduce=R, round=_donate()), params="all")
    assert avg.step(0) is True
    assert avg.step(1) is True


def test_module_averager_writes_a_donated_average_once_and_keeps_off_steps_false():
    model = torch.nn.Linear(3, 1, bias=False)
    before = model.weight.detach().clone()
    storage = model.weight.data_ptr()
    avg = avgfn.ModuleAverager(model, avgfn.periodic(2, reduce=HALF, round=_donate()), params="all")
    assert avg.step(0) is True
    assert torch.equal(model.weight.detach(), before / 2) and model.weight.data_ptr() == storage
    assert avg.step(1) is False
    assert torch.equal(model.weight.detach(), before / 2)
    assert int(avg.state.rounds) == 1


def test_module_averager_still_reports_no_change_for_a_temporal_average():
    model = torch.nn.Linear(3, 1, bias=False)
    avg = avgfn.ModuleAverager(model, avgfn.ema(0.9))  # keeps its average in the state
    assert avg.step(0) is False and avg.step(1) is False


def test_a_skipped_donated_round_hands_back_the_params_themselves():
    # the health flags say one of two replicas is unhealthy: "skip" keeps everything
    def reduce(t):
        return torch.tensor([0.5, 0.5, 0.0]) if t.numel() == 3 else t  # [unhealthy, healthy, no room]

    params = {"w": torch.ones(3)}
    out = avgfn.average(params, reduce, round=avgfn.Round(donate=True, nonfinite="skip"))
    assert out is params and torch.equal(params["w"], torch.ones(3))
    model = torch.nn.Linear(3, 1, bias=False)
    live = avgfn.ModuleAverager(
        model, avgfn.periodic(2, reduce=reduce, round=avgfn.Round(donate=True, nonfinite="skip")), params="all"
    )  # no backward pass here: "all", or torch's filter would leave the weight out
    assert live.step(0) is False


class _PairOfEquals(avgfn.ForwardingReduce):
    """A group of two replicas that hold the same values: divide by 2, then the sum doubles."""

    def __init__(self):
        super().__init__(lambda t: t)

    @property
    def size(self):
        return 2

    def divisor(self):
        return 2

    def start_sum(self, tensor):
        return _Done(tensor * 2)

    def start(self, tensor):
        return _Done(tensor.clone())


class _Done:
    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


@pytest.mark.parametrize(
    "rnd",
    [
        avgfn.Round(comm_dtype=torch.float16, donate=True),
        avgfn.Round(comm_dtype=torch.float16, donate=True, bucket_bytes=1 << 20),
        avgfn.Round(comm_dtype=torch.float16, donate=True, error_feedback=True),
    ],
    ids=["small-leaves", "buckets", "error-feedback"],
)
def test_a_value_past_the_wire_range_is_refused_on_every_packing_path(rnd):
    # 1e5 fits an fp16 wire once halved, but some paths cast before they divide
    params = {"w": torch.full((4,), 1e5), "b": torch.ones(4)}
    before = {k: v.clone() for k, v in params.items()}
    avg = avgfn.periodic(2, reduce=_PairOfEquals(), round=rnd)
    state = avg.init(params)
    with pytest.raises(avgfn.NonFiniteError, match="too large for the wire dtype at \\['w'\\]"):
        avg.update(params, state, 0)
    for k in params:
        assert torch.equal(params[k], before[k])


@pytest.mark.parametrize("make", [
    lambda: avgfn.fedavgm(2, reduce=lambda t: t, weight=1.0),
    lambda: avgfn.diloco(2, reduce=lambda t: t),
    lambda: avgfn.periodic(2, reduce=lambda t: t),
], ids=["fedavgm", "diloco", "periodic"])
def test_a_round_with_no_leaf_selected_passes_through(make):
    params = {"n": torch.tensor(6)}  # an integer leaf: nothing to average
    avg = make()
    state = avg.init(params)
    for step in (0, 1):
        out, state = avg.update(params, state, step)
        assert torch.equal(out["n"], params["n"])


@pytest.mark.parametrize("rnd", [avgfn.Round(), avgfn.Round(nonfinite="skip"), avgfn.Round(bucket_bytes=16)])
def test_a_float16_mean_that_overflows_is_refused_by_name(rnd):
    # each replica's value fits float16, their mean does not (the fake peer holds 4x more)
    params = {"a": torch.ones(8, dtype=torch.float16), "w": torch.full((8,), 30000.0, dtype=torch.float16)}
    before = {k: v.clone() for k, v in params.items()}
    reduce = peers_mean(lambda t: t * 4)
    if rnd.nonfinite == "skip":
        out = avgfn.average(params, reduce, round=rnd)
        assert all(torch.equal(out[k], before[k]) for k in params)
    else:
        with pytest.raises(avgfn.NonFiniteError, match=re.escape("mean is non-finite at ['w']")) as caught:
            avgfn.average(params, reduce, round=rnd)
        assert caught.value.paths == ()  # this replica's own values are finite
    assert all(torch.equal(params[k], before[k]) for k in params)


def test_the_mean_dtype_of_integer_leaves_follows_the_default_dtype():
    params = {"n": torch.arange(4)}
    old = torch.get_default_dtype()
    try:
        for dtype in (torch.float32, torch.float64, torch.float32):
            torch.set_default_dtype(dtype)
            reduce = RecordingReduce(lambda t: t)
            avgfn.average(params, reduce, where=lambda leaf: True)
            assert reduce.inputs[0].dtype == dtype
    finally:
        torch.set_default_dtype(old)



def test_a_refusal_at_another_step_names_both_steps():
    # the refusal says why; the steps say that the schedules may be out of step as well
    from avgfn.collectives import _first_difference

    refused = [("<step>", "1"), ("<round>", "r"), ("<refused>", "TypeError: bad")]
    plain = [("<step>", "2"), ("<round>", "r"), ("['a']", "(3,) torch.float32")]
    message = _first_difference([plain, refused], [0, 1])
    assert message.startswith("rank 1 refused the round (TypeError: bad), at step 1 of its schedule")
    assert "rank 0 averages at step 2" in message
    same = _first_difference([plain, [("<step>", "2"), *refused[1:]]], [0, 1])
    assert same == "rank 1 refused the round (TypeError: bad)"
    # a check without a step (init's, an outer step's first-round check of its global copy)
    for check in ([("<values>", "v"), ("['a']", "(3,) torch.float32")], [("<step>", "none"), *plain[1:]]):
        assert _first_difference([check, refused], [0, 1]) == "rank 1 refused the round (TypeError: bad)"


def test_a_mismatch_says_what_kind_of_difference_it_found():
    # ReplicaMismatchError.differs: what the message names, for a caller to act on
    from avgfn.collectives import _difference

    leaf = ("['a']", "(3,) torch.float32")
    base = [("<step>", "2"), ("<round>", "r"), leaf]
    cases = {
        "refused": [("<step>", "2"), ("<round>", "r"), ("<refused>", "TypeError: bad")],
        "step": [("<step>", "3"), ("<round>", "r"), leaf],
        "leaves": [("<step>", "2"), ("<round>", "r"), ("['a']", "(4,) torch.float32")],
        "round": [("<step>", "2"), ("<round>", "other averager"), leaf],
        "values": [("<step>", "2"), ("<round>", "r"), leaf, ("<values>", "v")],
    }
    for kind, other in cases.items():
        assert _difference([base, other], [0, 1])[0] == kind, (kind, _difference([base, other], [0, 1]))
    # a check outside any round and a round without a step are told apart from a step
    outside = [("<values>", "v"), leaf]
    assert "rank 1 in a check of its params outside any round" in _difference([base, outside], [0, 1])[1]
    no_step = [("<step>", "none"), ("<round>", "r"), leaf]
    assert "rank 1 in a round without a step (avgfn.average" in _difference([base, no_step], [0, 1])[1]


# --- a donated round checked before it is written (a sum that may overflow) ------------
# A plain Reduce's arithmetic is unknown: a donated round whose replica holds values past
# half the wire's range runs as the plain round and writes its checked mean back.


def test_a_donated_round_checked_before_it_is_written_reports_a_change():
    model = torch.nn.Linear(3, 1, bias=False).half()
    with torch.no_grad():
        model.weight.fill_(40000.0)  # past half of float16's range
    storage = model.weight.data_ptr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        avg = avgfn.ModuleAverager(model, avgfn.periodic(1, reduce=R, round=_donate()), params="all")
    assert avg.step(0) is True
    assert model.weight.data_ptr() == storage and bool((model.weight == 40000.0).all())
    params = {"w": torch.full((3,), 40000.0, dtype=torch.float16)}
    periodic = avgfn.periodic(2, reduce=R, round=_donate())
    new, _ = periodic.update(params, periodic.init(params), 0)
    assert new is not params and new["w"] is params["w"]


def test_a_donated_round_checked_before_it_is_written_keeps_its_rounding_error():
    def make(donate):
        return avgfn.periodic(
            2, reduce=R, round=avgfn.Round(donate=donate, comm_dtype=torch.bfloat16, error_feedback=True)
        )

    values = torch.tensor([2.0e38, 1.0 + 2.0**-12, -2.5e38])  # past half of bfloat16's range
    pure, donated = make(False), make(True)
    expected, pure_state = pure.update({"w": values.clone()}, pure.init({"w": values}), 0)
    params = {"w": values.clone()}
    out, state = donated.update(params, donated.init(params), 0)
    assert out["w"] is params["w"] and torch.equal(out["w"], expected["w"])
    assert torch.equal(state.residual[0], pure_state.residual[0])
    assert bool(state.residual[0].abs().sum() > 0)  # the rounding error was kept, not dropped


def test_a_donated_round_on_a_narrow_wire_stays_donated_while_its_values_have_room(monkeypatch):
    from avgfn._round import engine

    staged = []
    original = engine._written_back
    monkeypatch.setattr(engine, "_written_back", lambda leaves, averaged: staged.append(1) or original(leaves, averaged))
    for value, expected in ((1.0, []), (2.0e38, [1])):  # bfloat16's largest value is about 3.4e38
        staged.clear()
        params = {"w": torch.full((3,), value)}
        out = avgfn.average(params, R, round=avgfn.Round(donate=True, comm_dtype=torch.bfloat16))
        assert out["w"] is params["w"] and staged == expected, (value, staged)
