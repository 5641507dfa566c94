"""``carlrar selfcheck`` passes on CPU for every registered method (how CI runs it), and each of its checks fails
when its defect is planted: dropout replay that skips restoring the RNG, a tensor kept off the device, an operation
mixing devices, a device this machine does not have."""

import contextlib

import pytest
import torch

import carlrar.methods
from carlrar.cli import main
from carlrar.methods import METHODS, DropoutReplay, Method, freelb_step
from carlrar.selfcheck import DeviceWatch, run_selfcheck


def test_selfcheck_passes_on_cpu_for_every_method(capsys):
    main(["selfcheck", "--device", "cpu", "--steps", "4"])  # exit status 0: no SystemExit
    lines = capsys.readouterr().out.splitlines()
    verdicts = {line.split()[0]: line for line in lines[1:-1]}
    assert list(verdicts) == list(METHODS) and lines[-1] == f"{len(METHODS)} of {len(METHODS)} methods ok"
    for name, line in verdicts.items():
        assert line.split()[1] == "ok" and "ms/step" in line and "save + reload, 3-step attack" in line
        assert ("dropout replay" in line) == (METHODS[name].step is freelb_step)


def test_replay_that_skips_restoring_the_rng_fails_the_selfcheck(monkeypatch, capsys):
    monkeypatch.setattr(DropoutReplay, "same_masks", lambda self: contextlib.nullcontext())
    monkeypatch.setattr(carlrar.methods, "METHODS", {k: METHODS[k] for k in ("base", "freelb")})
    with pytest.raises(SystemExit) as e:
        main(["selfcheck", "--steps", "2"])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "1 of 2 methods ok; failed: freelb" in out
    line = next(x for x in out.splitlines() if x.startswith("freelb"))
    assert line.split()[1] == "FAIL" and "dropout replay: replayed passes differ by" in line


def test_a_method_tensor_off_the_device_fails_the_selfcheck(monkeypatch):
    real = Method.state_tensors
    monkeypatch.setattr(Method, "state_tensors", lambda self: {**real(self), "bank_orig": torch.zeros(3, 4,
                                                                                                      device="meta")})
    (verdict,) = run_selfcheck("cpu", steps=2, methods=["base"], say=lambda line: None)
    assert not verdict.ok and verdict.problems == ["method tensor bank_orig on meta"]


def test_device_watch_flags_an_operation_that_mixes_devices():
    x, watch = torch.ones(2, device="meta"), DeviceWatch()  # "meta" stands in for a GPU here
    with watch:
        _ = x * 2.0 + x.sum()  # Python numbers and tensors on one device: fine
        _ = x[torch.tensor(0)]  # a 0-d integer (how torch's kernels pass RNG seeds): not counted
    assert watch.report() == []
    with watch:
        _ = x * torch.tensor(2.0)  # a CPU scalar tensor meets the device: no error, a silent copy on a GPU
        _ = x[torch.tensor([0, 1])]  # CPU indices into a device tensor
    assert watch.report() == ["aten.index.Tensor mixes cpu and meta", "aten.mul.Tensor mixes cpu and meta"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_that_is_not_here_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["selfcheck", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: device = 'cuda': not available here")
