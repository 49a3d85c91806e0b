"""Overlapped DiLoCo: a reference written from the equations of Kale et al. (2025), bit for
bit, the schedule (which step starts, which applies), a skipped sync step (its stale mean
dropped), a repeated apply refused, a checkpoint taken with a mean in flight, bad arguments."""

from __future__ import annotations

import io

import pytest
import torch
from torch.func import vmap

import avgfn
from avgfn import diloco, optim, overlapped_diloco, simulate
from avgfn.testing import RecordingReduce, peers_mean

H = 3  # period
ROUNDS = 4
M = 4
LR, MOMENTUM = 0.5, 0.5  # dyadic: every value below is exact in float32, in any order


def start() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([[0.25, 4.0]], dtype=torch.float64)}


def drift(rank: int, step: int, like: torch.Tensor) -> torch.Tensor:
    """Replica ``rank``'s local step ``step``: a dyadic change, different per replica and leaf."""
    base = torch.arange(like.numel(), dtype=like.dtype).reshape(like.shape)
    return (base + 1) * (rank + 1) * ((step % 5) + 1) / 16


def local_step(params: dict[str, torch.Tensor], rank, step: int) -> dict[str, torch.Tensor]:
    return {k: v - drift(rank, step, v) for k, v in params.items()}


def reference(eager: bool, world: int, steps: int) -> list[dict[str, list[torch.Tensor]]]:
    """The paper's two overlapped outer steps, per replica, as written there.

    ``Delta_m(t) = theta_m(t-1) - theta_local_m``; delayed: the outer step at
    round ``t`` uses ``Delta(t-1) = mean_j Delta_j(t-1)`` (none at round 1);
    eager: ``Delta_m(t) / M + sum_{j != m} Delta_j(t-1) / M``. The outer
    optimizer is SGD with momentum (``buf = mu * buf + d; theta -= lr * buf``).
    """
    keys = list(start())
    theta = [start() for _ in range(world)]
    buf = [{k: torch.zeros_like(v) for k, v in start().items()} for _ in range(world)]
    local = [start() for _ in range(world)]
    previous = None
    history = []
    for step in range(steps):
        local = [local_step(local[m], m, step) for m in range(world)]
        if (step + 1) % H == 0:
            delta = [{k: theta[m][k] - local[m][k] for k in keys} for m in range(world)]
            for m in range(world):
                if eager:
                    d = {}
                    for k in keys:
                        others = sum((previous[j][k] for j in range(world) if j != m), torch.zeros_like(delta[m][k])) if previous else 0.0
                        d[k] = delta[m][k] / world + others / world
                elif previous is not None:
                    d = {k: sum(previous[j][k] for j in range(world)) / world for k in keys}
                else:
                    d = None
                if d is not None:
                    for k in keys:
                        buf[m][k] = MOMENTUM * buf[m][k] + d[k]
                        theta[m][k] = theta[m][k] - LR * buf[m][k]
                local[m] = {k: v.clone() for k, v in theta[m].items()}
            previous = delta
        history.append({k: [local[m][k].clone() for m in range(world)] for k in keys})
    return history


def outer() -> avgfn.optim.Optimizer:
    return optim.sgd(LR, momentum=MOMENTUM)


@pytest.mark.parametrize("eager", [True, False])
def test_simulated_replicas_equal_the_papers_equations_bit_for_bit(eager):
    steps = H * ROUNDS
    avg = overlapped_diloco(H, reduce=simulate.replica_mean(), eager=eager, num_replicas=M, outer_optimizer=outer())

    def step_fn(params, state, rank, step):
        return avg.update(local_step(params, rank, step), state, step)

    params = simulate.stack([start() for _ in range(M)])
    state = vmap(avg.init)(params)
    ranks = torch.arange(M)
    want = reference(eager, M, steps)
    for step in range(steps):
        params, state = vmap(step_fn, in_dims=(0, 0, 0, None))(params, state, ranks, step)
        for k in params:
            for m in range(M):
                assert torch.equal(params[k][m], want[step][k][m]), (eager, step, k, m)
    if eager:  # the replicas' global copies differ by their own shares
        assert not torch.equal(state.global_params[0][0], state.global_params[0][1])


def test_eager_against_one_peer_outside_a_transform():
    """Eagerly (no vmap), with a peer whose pseudo-gradient is minus ours: d(t) = (D(t) - D(t-1)) / 2."""
    avg = overlapped_diloco(H, reduce=peers_mean(lambda t: -t), num_replicas=2, outer_optimizer=optim.sgd(LR))
    params = start()
    state = avg.init(params)
    theta = start()
    previous = {k: torch.zeros_like(v) for k, v in theta.items()}
    for step in range(H * ROUNDS):
        params = local_step(params, 0, step)
        if (step + 1) % H == 0:
            delta = {k: theta[k] - params[k] for k in theta}
            theta = {k: theta[k] - LR * (delta[k] / 2 + (-previous[k]) / 2) for k in theta}
            previous = delta
        params, state = avg.update(params, state, step)
        if (step + 1) % H == 0:
            for k in theta:
                assert torch.equal(params[k], theta[k]), (step, k)
    assert torch.equal(state.pending[0], torch.zeros(3))  # our pseudo-gradient and minus it


def test_one_replica_eager_is_diloco_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(3, generator=g) for _ in range(12)]
    a = overlapped_diloco(4, reduce=lambda t: t, num_replicas=1)
    b = diloco(4, reduce=lambda t: t)
    pa = pb = {"w": torch.randn(3, generator=g)}
    sa, sb = a.init(pa), b.init(pb)
    for step in range(12):
        pa, sa = a.update({"w": pa["w"] - 0.1 * noise[step]}, sa, step)
        pb, sb = b.update({"w": pb["w"] - 0.1 * noise[step]}, sb, step)
        assert torch.equal(pa["w"], pb["w"]), step
    assert torch.equal(sa.global_params[0], sb.global_params[0])


@pytest.mark.parametrize("eager", [True, False])
def test_the_schedule_starts_at_each_sync_step_and_applies_at_the_next(eager):
    reduce = RecordingReduce()
    avg = overlapped_diloco(H, reduce=reduce, eager=eager, num_replicas=1, outer_optimizer=optim.sgd(1.0))
    params = {"w": torch.zeros(2)}
    state = avg.init(params)
    starts, tags, globals_ = [], [], []
    for step in range(3 * H):
        calls = reduce.calls
        params, state = avg.update({"w": params["w"] - 1.0}, state, step)
        starts.append(reduce.calls > calls)
        tags.append(int(state.in_flight))
        globals_.append(float(state.global_params[0][0]))
    assert starts == [False, False, True] * 3
    assert tags == [-1, -1, 2, 2, 2, 5, 5, 5, 8]
    if eager:  # a group of one: its own share is the whole mean, at once
        assert globals_ == [0.0, 0.0, -3.0, -3.0, -3.0, -6.0, -6.0, -6.0, -9.0]
    else:  # the first round's mean (3) is applied at step 5, the second's at step 8
        assert globals_ == [0.0, 0.0, 0.0, 0.0, 0.0, -3.0, -3.0, -3.0, -6.0]
        assert int(state.skipped) == 1  # the first sync step had nothing to apply


@pytest.mark.parametrize("eager", [True, False])
def test_a_skipped_sync_step_drops_its_stale_average_and_a_repeated_apply_is_refused(eager):
    avg = overlapped_diloco(H, reduce=lambda t: t, eager=eager, num_replicas=1, outer_optimizer=optim.sgd(1.0))
    params = {"w": torch.zeros(2)}
    state = avg.init(params)
    params, at_first_sync = avg.update({"w": torch.full((2,), -1.0)}, state, H - 1)  # starts delta = 1
    assert int(at_first_sync.in_flight) == H - 1
    # the sync step at 5 was skipped: at step 8 the mean started at step 2 is stale, never applied
    new, state = avg.update({"w": params["w"] - 2.0}, at_first_sync, 3 * H - 1)
    assert int(state.in_flight) == 3 * H - 1
    if eager:  # a group of one: the own share (2) only, not the stale 1 again
        assert torch.equal(new["w"], params["w"] - 2.0)
    else:  # nothing delayed applied: the local params restart from the unchanged global copy
        assert torch.equal(new["w"], params["w"]) and int(state.skipped) == 2
    # applied once at step 5; passing that step's result to step 5 again is refused, unchanged
    _, after = avg.update(params, at_first_sync, 2 * H - 1)
    before = [g.clone() for g in after.global_params]
    with pytest.raises(ValueError, match="started at step 2 is due.*started at step 5"):
        avg.update(params, after, 2 * H - 1)
    assert all(torch.equal(a, b) for a, b in zip(after.global_params, before))
    assert int(after.in_flight) == 2 * H - 1


@pytest.mark.parametrize("eager", [True, False])
def test_nothing_in_flight_skips_the_delayed_part(eager):
    """A state with nothing in flight (a fresh init at a later step): nothing stale is applied."""
    avg = overlapped_diloco(H, reduce=lambda t: t, eager=eager, num_replicas=1, outer_optimizer=optim.sgd(1.0))
    params = {"w": torch.zeros(2)}
    state = avg.init(params)
    new, new_state = avg.update({"w": torch.full((2,), -1.0)}, state, 4 * H - 1)
    assert int(new_state.in_flight) == 4 * H - 1
    if eager:  # the own share only
        assert torch.equal(new["w"], torch.full((2,), -1.0))
    else:  # nothing applied; the local params restart from the global copy
        assert torch.equal(new["w"], torch.zeros(2)) and int(new_state.skipped) == 1


@pytest.mark.parametrize("eager", [True, False])
def test_a_checkpoint_with_an_average_in_flight_resumes_exactly(eager):
    reduce = peers_mean(lambda t: t * 0.25 + 1.0)
    avg = overlapped_diloco(H, reduce=reduce, eager=eager, num_replicas=2)

    def run(params, state, steps):
        for step in steps:
            params, state = avg.update(local_step(params, 0, step), state, step)
        return params, state

    final, final_state = run(start(), avg.init(start()), range(4 * H))
    mid, mid_state = run(start(), avg.init(start()), range(H + 1))  # in flight since step 2
    assert int(mid_state.in_flight) == H - 1
    buffer = io.BytesIO()
    torch.save({"params": mid, "avg": avgfn.state_dict(mid_state)}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    restored = avgfn.load_state_dict(avg.init(start()), saved["avg"])
    resumed, resumed_state = run(saved["params"], restored, range(H + 1, 4 * H))
    for k in final:
        assert torch.equal(resumed[k], final[k]), k
    for a, b in zip(torch.utils._pytree.tree_leaves(resumed_state), torch.utils._pytree.tree_leaves(final_state)):
        assert torch.equal(a, b)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_replicas"):
        overlapped_diloco(2, reduce=lambda t: t)  # eager with a plain Reduce
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        overlapped_diloco(2, reduce=lambda t: t, num_replicas=0)
    with pytest.raises(TypeError, match="eager must be a bool"):
        overlapped_diloco(2, reduce=lambda t: t, eager="yes")
    with pytest.raises(ValueError, match="period"):
        overlapped_diloco(0, reduce=lambda t: t, eager=False)
    overlapped_diloco(2, reduce=lambda t: t, eager=False)  # the delayed step needs no M
    assert overlapped_diloco(2, reduce=avgfn.ForwardingReduce(lambda t: t)) is not None  # size 1
    eager = overlapped_diloco(2, reduce=lambda t: t, num_replicas=1)
    plain = overlapped_diloco(2, reduce=lambda t: t, eager=False)
    with pytest.raises(ValueError, match="eager=True"):
        plain.update(start(), eager.init(start()), 1)
