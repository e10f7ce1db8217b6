"""The trainer: determinism in (seed, step), bit-exact resume, the non-finite stop."""

import json
import math
import re
import shutil

import pytest
import torch

import metalens
from metalens import checkpoint, rng
from metalens.config import ConfigError
from metalens.run import RunConfig, RunFolderError, ensure_trained, load_run, start_run
from metalens.train import TrainConfig, TrainingDiverged, check_device, train


def _cfg(steps=8, **train):
    return RunConfig.resolve("sinusoid", "pretrain", {"shots": 5}, {"hidden": [16, 16], "finetune_steps": 2},
                             {"steps": steps, "batch_tasks": 4, "checkpoint_every": 4, "log_every": 2,
                              "lr": 0.01, **train})


def _params(learner):
    return {k: v.detach().clone() for k, v in learner.state_dict().items()}


def test_episode_depends_on_seed_and_step_only():
    fam = metalens.make_task("sinusoid")
    a = fam.episode(3, 10, 5)
    fam.episode(3, 0, 5)  # other draws in between must not matter
    b = fam.episode(3, 10, 5)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    assert not torch.equal(a.support_x, fam.episode(3, 11, 5).support_x)
    assert not torch.equal(a.support_x, fam.episode(4, 10, 5).support_x)


def test_same_seed_same_run_and_training_reduces_loss(tmp_path):
    runs = []
    for i in range(2):
        run = start_run(_cfg(steps=30), tmp_path / f"r{i}")
        run.train(progress=False)
        runs.append(run)
    p0, p1 = _params(runs[0].learner), _params(runs[1].learner)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    log = [json.loads(line) for line in (tmp_path / "r0" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(2, 31, 2))
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-3:]) / 3
    assert last < first, (first, last)


def test_resume_is_bit_exact(tmp_path):
    full = start_run(_cfg(steps=8), tmp_path / "full")
    full.train(progress=False)
    # An interrupted run: 4 steps (checkpoint at 4), then resumed to 8 from the folder alone.
    part = start_run(_cfg(steps=4), tmp_path / "part")
    part.train(progress=False)
    resumed = start_run(_cfg(steps=8), tmp_path / "part", resume=True)
    resumed.train(resume=True, progress=False)
    pf, pr = _params(full.learner), _params(resumed.learner)
    assert all(torch.equal(pf[k], pr[k]) for k in pf), "resumed run differs from the uninterrupted one"
    loaded = load_run(tmp_path / "part")
    assert loaded.step == 8
    assert all(torch.equal(pf[k], v) for k, v in _params(loaded.learner).items())
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_resume_drops_log_lines_after_the_checkpoint(tmp_path):
    run = start_run(_cfg(steps=4), tmp_path / "r")
    run.train(progress=False)
    with open(tmp_path / "r" / "log.jsonl", "a") as f:  # a crash after logging step 6, before checkpoint 8
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n")
    resumed = start_run(_cfg(steps=8), tmp_path / "r", resume=True)
    resumed.train(resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    run = start_run(_cfg(steps=8), tmp_path / "r")
    real = run.learner.meta_loss
    calls = {"n": 0}

    def poisoned(episode, generator=None):
        calls["n"] += 1
        loss, m = real(episode, generator=generator)
        return (loss * float("nan") if calls["n"] == 6 else loss), m

    run.learner.meta_loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"non-finite loss \(nan\) at step 6; the last good checkpoint "
                                               r"is intact: .*step_00000004"):
        run.train(progress=False)
    ck = checkpoint.load(checkpoint.latest(tmp_path / "r"))
    assert ck.step == 4
    assert all(torch.isfinite(v).all() for v in ck.model.values())


def test_run_folder_is_never_overwritten(tmp_path):
    start_run(_cfg(), tmp_path / "r").train(progress=False)
    with pytest.raises(RunFolderError, match="holds a run; pass --resume"):
        start_run(_cfg(), tmp_path / "r")
    with pytest.raises(RunFolderError, match="different configuration"):
        start_run(_cfg(lr=0.5), tmp_path / "r", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="is not empty"):
        start_run(_cfg(), tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(RunFolderError, match="not a metalens run folder"):
        start_run(_cfg(), tmp_path / "other", resume=True)


def test_trainconfig_validation():
    for bad, match in [({"steps": 0}, "^steps must be >= 1, got 0$"), ({"lr": 0.0}, "^lr must be > 0, got 0.0$"),
                       ({"batch_tasks": 0}, "^batch_tasks must be >= 1, got 0$"),
                       ({"seed": -1}, "^seed must be >= 0, got -1$"),
                       ({"lr_schedule": "linear"}, "^lr_schedule must be one of 'constant', 'cosine', got 'linear'$"),
                       ({"lr_schedule": "cosine", "steps": 5, "lr_decay_start": 5},
                        r"^lr_decay_start must be in \[0, steps\) = \[0, 5\) with lr_schedule = cosine, got 5$"),
                       ({"lr_decay_start": -1}, "^lr_decay_start must be >= 0, got -1$")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
    # a decay start at or past the end is only refused with a cosine schedule (it is unused otherwise)
    assert TrainConfig(steps=5, lr_decay_start=5).lr_at(4) == TrainConfig().lr


_DEVICES = "must be cpu, cuda, cuda:N (N a device index) or mps"


@pytest.mark.parametrize("options, message", [
    ({"grad_clip": float("nan")}, "train.grad_clip must be finite, got nan"),
    ({"lr": float("inf")}, "train.lr must be finite, got inf"),
    ({"weight_decay": -0.1}, "train.weight_decay must be >= 0, got -0.1"),
    ({"keep_checkpoints": -1}, "train.keep_checkpoints must be >= 0, got -1"),
    ({"log_every": 0}, "train.log_every must be >= 1, got 0"),
    ({"optimizer": "lion"}, "train.optimizer must be one of 'adam', 'sgd', got 'lion'"),
    ({"steps": 10, "lr_schedule": "cosine", "lr_decay_start": 12},
     "train.lr_decay_start must be in [0, steps) = [0, 10) with lr_schedule = cosine, got 12"),
    ({"device": "meta"}, f"train.device {_DEVICES}, got 'meta'"),
    ({"device": "xla"}, f"train.device {_DEVICES}, got 'xla'"),
    ({"device": "cuda:"}, f"train.device {_DEVICES}, got 'cuda:'"),
    ({"device": "cpu cuda"}, f"train.device {_DEVICES}, got 'cpu cuda'"),
    ({"device": 0}, "train.device must be a string, got 0"),
])
def test_resolve_refuses_train_options_outside_their_declared_constraint(options, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        RunConfig.resolve("sinusoid", "oracle", {}, {}, options)


def test_devices_metalens_trains_on():
    for device in ("cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert TrainConfig(device=device).device == device
    check_device("cpu")
    for device in ("meta", "xla", "xpu", "banana"):
        with pytest.raises(ConfigError, match=f"^{re.escape(f'device {_DEVICES}, got {device!r}')}$"):
            check_device(device)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available on this machine"):
            check_device("cuda:0")
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="MPS is not available on this machine"):
            check_device("mps")


def test_cosine_schedule_values():
    c = TrainConfig(steps=10, lr=0.2, lr_schedule="cosine", lr_decay_start=4)
    assert [c.lr_at(s) for s in range(5)] == [0.2] * 5  # constant until the decay starts
    assert c.lr_at(7) == pytest.approx(0.1)  # half way through the 6 decaying steps
    assert c.lr_at(9) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert all(c.lr_at(s) > c.lr_at(s + 1) for s in range(4, 9))
    assert TrainConfig(steps=10, lr=0.2).lr_at(9) == 0.2
    assert c.constant_through(4) and not c.constant_through(5)


def test_cosine_schedule_equals_sgd_written_as_a_loop():
    """The optimiser takes step t with lr_at(t): plain SGD in a loop with the same rates ends in the same place."""
    cfg = TrainConfig(steps=6, batch_tasks=3, lr=0.05, optimizer="sgd", lr_schedule="cosine", lr_decay_start=2)
    fam = metalens.make_task("sinusoid", shots=5)
    torch.manual_seed(0)
    trained = metalens.make_learner("pretrain", fam, hidden=[8], finetune_steps=1)
    looped = metalens.make_learner("pretrain", fam, hidden=[8], finetune_steps=1)
    looped.load_state_dict(trained.state_dict())
    train(trained, fam, cfg, progress=False)
    for step in range(cfg.steps):
        loss, _ = looped.meta_loss(fam.episode(cfg.seed, step, cfg.batch_tasks),
                                   generator=rng.generator(cfg.seed, rng.Stream.LEARNER, step))
        grads = torch.autograd.grad(loss, list(looped.parameters()))
        with torch.no_grad():
            for p, g in zip(looped.parameters(), grads):
                p -= cfg.lr_at(step) * g
    for (k, a), b in zip(trained.state_dict().items(), looped.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert cfg.lr_at(5) < 0.05 / 4  # the schedule did change the rates


def test_resume_may_start_a_decay_where_the_constant_run_stopped(tmp_path):
    decayed = {"lr_schedule": "cosine", "lr_decay_start": 4}
    one_go = start_run(_cfg(steps=8, **decayed), tmp_path / "one")
    one_go.train(progress=False)
    start_run(_cfg(steps=4), tmp_path / "r").train(progress=False)  # constant lr, finished at 4
    resumed = start_run(_cfg(steps=8, **decayed), tmp_path / "r", resume=True)
    resumed.train(resume=True, progress=False)
    pa, pb = _params(one_go.learner), _params(resumed.learner)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # a decay that would have changed steps already taken, or a decaying run's length, is refused
    with pytest.raises(RunFolderError, match="different configuration"):
        start_run(_cfg(steps=12, lr_schedule="cosine", lr_decay_start=2), tmp_path / "r", resume=True)
    with pytest.raises(RunFolderError, match="different configuration"):
        start_run(_cfg(steps=12, **decayed), tmp_path / "r", resume=True)
    with pytest.raises(RunFolderError, match="different configuration"):
        start_run(_cfg(steps=8), tmp_path / "r", resume=True)
    # the same refusal where the caller resumes on its own (studies): no flag the user never passed
    with pytest.raises(RunFolderError, match="different configuration") as refused:
        ensure_trained(_cfg(steps=8), tmp_path / "r", progress=False)
    assert "--resume" not in str(refused.value) and "choose another --out folder" in str(refused.value)


def test_untrainable_learner_records_a_checkpoint(tmp_path):
    cfg = RunConfig.resolve("sinusoid", "oracle", {}, {}, {"steps": 5})
    run = start_run(cfg, tmp_path / "o")
    res = run.train(progress=False)
    assert res.checkpoint is not None and checkpoint.load(res.checkpoint).step == 5
    assert load_run(tmp_path / "o").learner.registry_name == "oracle"


def test_train_without_folder():
    fam = metalens.make_task("sinusoid")
    lrn = metalens.make_learner("pretrain", fam, hidden=[8])
    res = train(lrn, fam, TrainConfig(steps=3, batch_tasks=2), progress=False)
    assert res.step == 3 and res.checkpoint is None


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_meta_loss_trains_like_the_eager_one(capsys):
    """train.compile = true: the same second-order MAML steps as eager mode (float32 rounding apart)."""
    fam = metalens.make_task("sinusoid", shots=5, queries=5)
    runs = []
    for compiled in (False, True):
        learner = metalens.make_learner("maml", fam, seed=0, hidden=[8, 8], inner_steps=2)
        result = train(learner, fam, TrainConfig(steps=4, batch_tasks=3, seed=0, compile=compiled), progress=True)
        runs.append((_params(learner), result.last_metrics["loss"]))
        assert ("compiling the meta-loss" in capsys.readouterr().err) == compiled  # the slow first step says why
    (eager, loss_eager), (compiled, loss_compiled) = runs
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-4)
    for k in eager:
        assert not torch.equal(eager[k], metalens.make_learner("maml", fam, seed=0, hidden=[8, 8]).state_dict()[k])
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_loop_over_tasks_compiles_one_task_and_trains_like_eager():
    """Conv-4 MAML (loop over tasks): train.compile compiles one task's function, called for each task."""
    spec = metalens.TaskSpec(kind="classification", x_shape=(1, 28, 28), num_classes=3)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3)
    episode = metalens.Episode(torch.randn(3, 3, 1, 28, 28, generator=g), labels.repeat(3, 1),
                               torch.randn(3, 6, 1, 28, 28, generator=g), labels.repeat(3, 2), num_classes=3)
    learners = [metalens.make_learner("maml", spec, seed=0, backbone="conv4", channels=4, blocks=2, inner_steps=1,
                                      inner_lr=0.2) for _ in range(2)]
    meta_loss = learners[1].compiled_meta_loss()
    assert meta_loss == learners[1].meta_loss and learners[1]._compiled_task is not None  # not the whole loop
    calls, compiled_task = [], learners[1]._compiled_task

    def counted(*args):
        calls.append(1)
        return compiled_task(*args)

    learners[1]._compiled_task = counted
    grads = []
    for learner, fn in zip(learners, (learners[0].meta_loss, meta_loss)):
        loss, _ = fn(episode)
        loss.backward()
        grads.append({k: p.grad for k, p in learner.named_parameters()})
    for k in grads[0]:
        if k.startswith("net.features.") and k.endswith(".bias") and int(k.split(".")[2]) % 4 == 0:
            continue  # conv biases before batch norm: their gradient is rounding noise around 0
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-3, atol=1e-5)
    assert len(calls) == episode.n_tasks  # the compiled function ran once per task
    # learners with their own meta-loss compile all of it
    reptile = metalens.make_learner("reptile", spec, seed=0, backbone="conv4", channels=4, blocks=2)
    assert reptile.compiled_meta_loss() != reptile.meta_loss and reptile._compiled_task is None
