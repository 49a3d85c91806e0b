"""The nn.Module edge: ModuleAverager (in-place writes, buffer policies) and
AveragingOptimizer (a torch.optim wrapper whose state_dict carries the averager).

Single process, with avgfn.testing fakes for the peers; the 4-process oracle
against torch's PostLocalSGDOptimizer is ``test_post_local_oracle.py``.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import avgfn
from avgfn import testing
from avgfn import AveragingOptimizer
from avgfn import ModuleAverager

# torch.distributed.optim (imported for the comparison with torch's wrapper) uses torch.jit.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _zero_peer():
    # A group of two whose other member holds zeros: the mean halves every value.
    return testing.peers_mean(lambda t: torch.zeros_like(t))


def _train(model, steps=1):
    model.train()
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        model(torch.randn(8, 3, generator=g)).pow(2).mean().backward()


def test_module_averager_writes_in_place():
    model = _model()
    _train(model)  # BatchNorm running statistics move away from 0 / 1
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    avg = ModuleAverager(model, avgfn.periodic(3, reduce=_zero_peer()))
    assert avg.step(0) is True
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name] / 2), name
        assert p.data_ptr() == storage[name], "the parameter's storage must be kept"
        assert p.requires_grad and p.grad is not None
    for name, b in model.named_buffers():  # "local": buffers untouched
        assert torch.equal(b, before[name]), name
    assert avg.step(1) is False and avg.step(2) is False
    assert int(avg.state.rounds) == 1


def test_buffer_policies():
    averaged = {}
    for policy in ("local", "average", "ignore"):
        model = _model()
        _train(model)
        before = {k: v.detach().clone() for k, v in model.named_buffers()}
        ModuleAverager(model, avgfn.periodic(2, reduce=_zero_peer()), buffers=policy).step(0)
        averaged[policy] = {
            name: not torch.equal(b, before[name]) for name, b in model.named_buffers()
        }
    assert averaged["local"] == averaged["ignore"] == {
        "1.running_mean": False, "1.running_var": False, "1.num_batches_tracked": False
    }
    # Floating-point buffers are averaged; the integer counter stays local.
    assert averaged["average"] == {
        "1.running_mean": True, "1.running_var": True, "1.num_batches_tracked": False
    }


class BroadcastingWrapper(nn.Module):
    """Stands in for DDP(module, broadcast_buffers=True)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.broadcast_buffers = True


def test_local_buffers_refused_when_the_wrapper_broadcasts_them():
    with pytest.raises(ValueError, match="broadcast_buffers"):
        ModuleAverager(BroadcastingWrapper(_model()), avgfn.periodic(2, reduce=lambda t: t))
    ModuleAverager(BroadcastingWrapper(_model()), avgfn.periodic(2, reduce=lambda t: t), buffers="ignore")
    with pytest.raises(ValueError, match="buffers must be one of"):
        ModuleAverager(_model(), avgfn.periodic(2, reduce=lambda t: t), buffers="broadcast")
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        ModuleAverager({"w": torch.zeros(1)}, avgfn.periodic(2, reduce=lambda t: t))


def test_failed_reduce_writes_nothing():
    model = _model()
    _train(model)  # torch's filter (the default) averages only params with a gradient
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    avg = ModuleAverager(model, avgfn.periodic(2, reduce=testing.raising_reduce()))
    state = avg.state
    with pytest.raises(RuntimeError, match="fake reduce failure"):
        avg.step(0)
    assert avg.state is state
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_averaging_optimizer_equals_optimizer_then_averager():
    model, reference = _model(), _model()
    opt = AveragingOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        ModuleAverager(model, avgfn.periodic(3, reduce=_zero_peer(), warmup_steps=2)),
    )
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    ref_avg = ModuleAverager(reference, avgfn.periodic(3, reduce=_zero_peer(), warmup_steps=2))
    for step in range(8):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            _train(m)
            o.step()
        ref_avg.step(step)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p, q), step
    assert opt.iteration == 8 and int(opt.averager.state.rounds) == 2  # steps 2 and 5


def test_plain_averager_averages_the_param_groups():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.0},
        {"params": list(model[2].parameters()), "lr": 0.0},
    ]
    opt = AveragingOptimizer(torch.optim.SGD(groups, lr=0.0), avgfn.periodic(2, reduce=_zero_peer()))
    _train(model)
    opt.step()
    halved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    # The BatchNorm's affine params belong to no group: not averaged.
    assert halved == [True, True, False, False, True, True]


def _checkpoint_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _make(model, averager=None, optimizer=_sgd):
    averager = averager or avgfn.periodic(3, reduce=testing.peers_mean(lambda t: t * 0.5))
    return AveragingOptimizer(optimizer(model.parameters()), ModuleAverager(model, averager))


def _same_inner_state(a, b):
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(
        torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])
        for k in a["state"]
    )


def test_state_dict_resumes_exactly():
    model = _model()
    opt = _make(model)
    for _ in range(4):
        opt.zero_grad(); _train(model); opt.step()
    checkpoint = _checkpoint_roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    assert checkpoint["opt"]["avgfn"]["iteration"] == 4

    resumed_model = _model()
    resumed = _make(resumed_model)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.iteration == 4 and int(resumed.averager.state.rounds) == 2
    for _ in range(5):
        for m, o in ((model, opt), (resumed_model, resumed)):
            o.zero_grad(); _train(m); o.step()
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_bad_checkpoints_are_refused_and_change_nothing():
    model = _model()
    opt = _make(model)
    for _ in range(2):
        opt.zero_grad(); _train(model); opt.step()
    saved = _checkpoint_roundtrip(opt.state_dict())
    before_state, before_iteration = opt.averager.state, opt.iteration
    before_inner = _checkpoint_roundtrip(opt.optimizer.state_dict())

    plain = _sgd(_model().parameters()).state_dict()
    torch_style = dict(plain, step=5)  # what torch's PostLocalSGDOptimizer saves
    other_optimizer = _make(_model(), optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1)).state_dict()
    other_algorithm = _make(
        _model(), averager=avgfn.hierarchical([(2, lambda t: t), (4, lambda t: t)])
    ).state_dict()
    other_groups = AveragingOptimizer(
        _sgd(_model()[0].parameters()), avgfn.periodic(3, reduce=lambda t: t)
    ).state_dict()
    cases = [
        (plain, "no 'avgfn' entry"),
        (torch_style, "no 'avgfn' entry"),
        (other_optimizer, "saved around a 'Adam' optimizer, this one wraps a 'SGD'"),
        (other_algorithm, "holds a HierarchicalState"),
        (other_groups, "different number of parameters|size"),
    ]
    for checkpoint, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(checkpoint)
        assert opt.averager.state is before_state and opt.iteration == before_iteration
        assert _same_inner_state(opt.optimizer.state_dict(), before_inner)
    assert len(before_inner["state"]) == 6  # momentum buffers exist, so the check has teeth
    opt.load_state_dict(saved)  # the good one still loads
    assert opt.iteration == 2


def test_grad_scaler_skip_keeps_the_schedule():
    """An inf found by GradScaler skips the inner step, not the averaging or the count.

    torch's PostLocalSGDOptimizer under ``scaler.step(opt)`` skips its whole
    step, averaging and counter included (shown here with a counting averager).
    """
    from torch.distributed.algorithms.model_averaging.averagers import ModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    class CountingAverager(ModelAverager):
        def __init__(self):
            super().__init__(process_group=object())  # never used

        def average_parameters(self, params):
            self.step += 1

    def run(make_opt, step_fn):
        model = nn.Linear(2, 1)
        opt = make_opt(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        snapshots = []
        for it in range(4):
            opt.zero_grad()
            loss = model(torch.ones(1, 2)).sum() * (float("inf") if it == 1 else 1.0)
            scaler.scale(loss).backward()
            step_fn(opt, scaler)
            scaler.update()
            snapshots.append([p.detach().clone() for p in model.parameters()])
        return opt, snapshots

    torch_opt, _ = run(
        lambda m: PostLocalSGDOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), CountingAverager()),
        lambda opt, scaler: scaler.step(opt),
    )
    assert torch_opt.averager.step == 3  # 4 iterations, one skipped: its counter lags

    peer = testing.RecordingReduce(lambda t: t * 0.5)  # a peer at zero, as above
    ours, snaps = run(
        lambda m: AveragingOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
            ModuleAverager(m, avgfn.periodic(2, reduce=peer)),
        ),
        lambda opt, scaler: opt.step(scaler=scaler),
    )
    assert ours.iteration == 4
    assert peer.calls == 2  # iterations 0 and 2, whatever the scaler found
    # Iteration 1 (inf): no inner step and no averaging due, so the params stay.
    assert all(torch.equal(a, b) for a, b in zip(snaps[0], snaps[1]))
    # Iteration 2 averaged (the peer halves the values) after an inner step.
    assert not torch.equal(snaps[1][0], snaps[2][0])
    assert all(torch.isfinite(p).all() for p in snaps[-1])


def test_wrapper_plays_with_lr_schedulers_and_rejects_bad_input():
    model = _model()
    opt = _make(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad(); _train(model); opt.step(); sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025) and opt.iteration == 2
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        AveragingOptimizer(object(), avgfn.periodic(2, reduce=lambda t: t))
    with pytest.raises(TypeError, match="averager must be an avgfn.ModuleAverager"):
        AveragingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), object())
