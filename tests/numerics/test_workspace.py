"""Scratch buffers: reused, grown on demand, per thread, never handed back as results."""

from __future__ import annotations

import threading

import torch

from abfp import ABFPConfig
from abfp import functional as AF
from abfp.numerics import workspace


def test_scratch_reuses_and_grows():
    workspace.release()
    a = workspace.scratch("t", (4, 5), torch.float32, "cpu")
    b = workspace.scratch("t", (2, 3), torch.float32, "cpu")
    assert a.data_ptr() == b.data_ptr() and b.is_contiguous() and b.shape == (2, 3)
    c = workspace.scratch("t", (100,), torch.float32, "cpu")
    assert c.numel() == 100 and workspace.held_bytes() >= 400
    other = workspace.scratch("u", (4, 5), torch.float32, "cpu")
    assert other.data_ptr() != c.data_ptr()
    workspace.release()
    assert workspace.held_bytes() == 0


def test_scratch_is_per_thread():
    mine = workspace.scratch("t", (8,), torch.float32, "cpu")
    seen = []
    th = threading.Thread(target=lambda: seen.append(workspace.scratch("t", (8,), torch.float32, "cpu").data_ptr()))
    th.start()
    th.join()
    assert seen[0] != mine.data_ptr()


def test_results_never_alias_scratch():
    cfg = ABFPConfig(noise_std=1.0, seed=0)
    x = torch.randn(64, 256)
    w = torch.randn(32, 256)
    y1 = AF.linear(x, w, config=cfg)
    keep = y1.clone()
    AF.linear(torch.randn(64, 256), w, config=cfg)  # reuses every scratch buffer
    assert torch.equal(y1, keep)
    xi = torch.randn(2, 8, 9, 9)
    wi = torch.randn(4, 8, 3, 3)
    with torch.no_grad():
        c1 = AF.conv2d(xi, wi, padding=1, config=cfg)
        keep = c1.clone()
        AF.conv2d(torch.randn(2, 8, 9, 9), wi, padding=1, config=cfg)
    assert torch.equal(c1, keep)


def test_buffers_first_made_under_inference_mode_serve_later_calls():
    """A converted model run first under ``torch.inference_mode`` made its scratch buffers inference
    tensors; every later call outside it (``no_grad``, training) failed with "Inplace update to
    inference tensor outside InferenceMode"."""
    import abfp
    from torch import nn

    workspace.release()
    torch.manual_seed(0)
    am = abfp.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 5)), ABFPConfig(tile_width=8),
                      execution=abfp.ExecutionOptions(seed=0))
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        abfp.reseed(am)
        y_inf = am(x)
    assert not workspace.scratch("phases", (4,), torch.float32, "cpu").is_inference()
    with torch.no_grad():
        abfp.reseed(am)
        assert torch.equal(am(x), y_inf)
    am(x).sum().backward()
    assert am[0].weight.grad is not None
