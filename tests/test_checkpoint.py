"""Checkpoints: exact round trips, atomic replacement, no pickle."""

import json

import pytest
import torch

from metalens import checkpoint


def _adam_state():
    w = torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    return w, opt


def test_roundtrip_is_exact(tmp_path):
    w, opt = _adam_state()
    checkpoint.save(tmp_path, step=3, model={"w": w.detach()}, optimizer=opt.state_dict(), state={"seed": 7})
    ck = checkpoint.load(checkpoint.latest(tmp_path))
    assert ck.step == 3 and ck.state["seed"] == 7
    assert torch.equal(ck.model["w"], w.detach())
    w2 = torch.nn.Parameter(ck.model["w"].clone())
    opt2 = torch.optim.Adam([w2], lr=0.5)
    opt2.load_state_dict(ck.optimizer)
    for o, p in ((opt, w), (opt2, w2)):  # one more identical step from both
        o.zero_grad()
        (p ** 2).sum().backward()
        o.step()
    assert torch.equal(w, w2)
    assert opt2.param_groups[0]["lr"] == 0.1


def test_keep_and_latest(tmp_path):
    for s in (1, 2, 3):
        checkpoint.save(tmp_path, step=s, model={"w": torch.full((2,), float(s))}, optimizer=None,
                        state={}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000002", "step_00000003"]
    assert checkpoint.load(checkpoint.latest(tmp_path)).model["w"].tolist() == [3.0, 3.0]


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, step=1, model={"w": torch.ones(2)}, optimizer=None, state={})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(checkpoint.RunFailed, match="disk full; the previous checkpoint is intact"):
        checkpoint.save(tmp_path, step=2, model={"w": torch.zeros(2)}, optimizer=None, state={})
    ck = checkpoint.load(checkpoint.latest(tmp_path))
    assert ck.step == 1 and ck.model["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.latest(tmp_path)
    path = checkpoint.save(tmp_path, step=1, model={"w": torch.ones(1)}, optimizer=None, state={})
    (path / "model.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors is missing"):
        checkpoint.load(path)
    path = checkpoint.save(tmp_path, step=2, model={"w": torch.ones(1)}, optimizer=None, state={})
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="does not match the checksum"):
        checkpoint.load(path)
    state = json.loads((path / "state.json").read_text())
    del state["sha256"]  # a checkpoint written without checksums: the tensors' own format check
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(path)
    (tmp_path / "checkpoints" / "latest").write_text("../../etc\n")
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint folder"):
        checkpoint.latest(tmp_path)


def test_no_pickle_in_files(tmp_path):
    _, opt = _adam_state()
    path = checkpoint.save(tmp_path, step=1, model={"w": torch.ones(2)}, optimizer=opt.state_dict(), state={})
    state = json.loads((path / "state.json").read_text())
    assert state["format"] == "metalens-checkpoint" and state["step"] == 1
    for f in path.iterdir():
        assert not f.read_bytes().startswith(b"\x80"), f"{f.name} looks like a pickle"
