"""The native kernels (batch norm -> ReLU -> 2x2 max-pool; (2x2 max-pool ->) batch norm -> GELU)
compute what the stock layers compute, are built once and reused, and training falls back to
PyTorch's kernels without them."""
import stat

import pytest
import torch
from torch import nn

from cnnlab import kernels
from cnnlab.layers import BNReLUPool2, Dropout, Net, bn_gelu, bn_relu_pool
from cnnlab.presets import PRESETS, build_model
from cnnlab.runtime import environment
from conftest import random_bn

HAVE_COMPILER = kernels.find_compiler() is not None
needs_kernels = pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler here: native kernels not built")


def _reference(x, bn, grad):
    """Stock layers in float64 on the same input values: output, input/weight/bias gradients,
    and the batch norm's state afterwards."""
    ref_bn = nn.BatchNorm2d(bn.num_features, momentum=bn.momentum).double()
    ref_bn.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in bn.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    y = nn.Sequential(ref_bn, nn.ReLU(), nn.MaxPool2d(2))(x64)
    y.backward(grad.double())
    return y.detach(), x64.grad, ref_bn.weight.grad, ref_bn.bias.grad, ref_bn.state_dict()


@needs_kernels
def test_a_compiler_here_builds_the_kernels():
    assert kernels.library() is not None, kernels.status()
    assert kernels.status() == "on"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,momentum", [
    ((8, 16, 12, 12), 0.1),
    ((3, 5, 7, 9), None),   # odd sizes: pooling drops the last row/column, the statistics do not
    ((2, 3, 2, 2), 0.3),
    ((4, 70, 6, 4), 0.1),   # more channels than one vector register holds
])
def test_native_matches_stock_layers(dtype, shape, momentum):
    torch.manual_seed(1)
    x = (torch.randn(*shape) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, :, :2, :2] = 0.25  # a window of ties: the first position wins, as in PyTorch
    bn = random_bn(shape[1], 2, momentum)
    assert (bn.weight < 0).any() and (bn.weight > 0).any()
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype)
    y_ref, dx_ref, dw_ref, db_ref, state_ref = _reference(x, bn, grad)
    assert kernels.supports(x, bn)
    xn = x.clone().requires_grad_()
    y = bn_relu_pool(xn, bn)
    y.backward(grad)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert xn.grad.dtype == dtype and xn.grad.is_contiguous(memory_format=torch.channels_last)
    # float32 agrees to float32 rounding; bfloat16 to the rounding of its stored outputs
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(y.detach().double(), y_ref, rtol=tol, atol=tol * float(y_ref.abs().max()))
    torch.testing.assert_close(xn.grad.double(), dx_ref, rtol=tol, atol=tol * float(dx_ref.abs().max()))
    torch.testing.assert_close(bn.weight.grad.double(), dw_ref, rtol=1e-4, atol=1e-4 * float(dw_ref.abs().max()))
    torch.testing.assert_close(bn.bias.grad.double(), db_ref, rtol=1e-4, atol=1e-4 * float(db_ref.abs().max()))
    for key, value in state_ref.items():
        torch.testing.assert_close(bn.state_dict()[key].double() if value.is_floating_point() else bn.state_dict()[key],
                                   value, rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dropout_is_inverted_dropout_on_the_block_output(dtype):
    torch.manual_seed(0)
    n, c, h, w, p = 16, 24, 16, 16, 0.25
    x = (torch.randn(n, c, h, w) * 2).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, c, h // 2, w // 2).to(dtype)
    bn = random_bn(c, 1)
    with torch.no_grad():
        bn.bias.add_(1.0)  # most outputs positive, so each channel's kept share is well measured
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    plain = bn_relu_pool(x.clone().requires_grad_(), bn)
    bn.load_state_dict(state)
    xd = x.clone().requires_grad_()
    dropped = bn_relu_pool(xd, bn, p)
    dropped.backward(grad)
    kept = dropped != 0
    alive = plain != 0
    assert not (kept & ~alive).any()  # dropout only zeroes
    torch.testing.assert_close(dropped[kept].float(), plain[kept].float() / (1 - p), rtol=2 ** -7, atol=0)
    share = kept.sum() / alive.sum()
    assert abs(float(share) - (1 - p)) < 0.01, share  # 1-p of the positive outputs kept
    assert (alive.sum((0, 2, 3)) > 200).all()
    per_channel = kept.sum((0, 2, 3)) / alive.sum((0, 2, 3))
    assert float((per_channel - (1 - p)).abs().max()) < 0.08
    # the gradient is the stock layers' through the same mask
    bn.load_state_dict(state)
    y_ref, dx_ref, dw_ref, db_ref, _ = _reference(x, bn, grad.double() * kept / (1 - p))
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(xd.grad.double(), dx_ref, rtol=tol, atol=tol * float(dx_ref.abs().max()))
    torch.testing.assert_close(bn.weight.grad.double(), dw_ref, rtol=1e-4, atol=1e-4 * float(dw_ref.abs().max()))


@needs_kernels
def test_fused_dropout_masks_repeat_with_the_seed_and_differ_between_calls():
    x = torch.randn(8, 16, 8, 8).contiguous(memory_format=torch.channels_last) + 3  # all outputs positive
    bn = nn.BatchNorm2d(16)
    masks = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        masks.append(bn_relu_pool(x.clone().requires_grad_(), bn, 0.5) != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    both = (masks[0] & masks[2]).float().mean()
    assert abs(float(both) - 0.25) < 0.03  # independent masks


@needs_kernels
def test_the_dropout_preset_fuses_its_two_block_dropouts(monkeypatch):
    torch.manual_seed(0)
    model = build_model(PRESETS["dropout"].layers, 10).to(memory_format=torch.channels_last)
    rates, plain = [], []
    apply = kernels.BNReLUPool2Native.apply
    monkeypatch.setattr(kernels.BNReLUPool2Native, "apply", lambda *a: rates.append(a[-1]) or apply(*a))
    forward = Dropout.forward
    monkeypatch.setattr(Dropout, "forward", lambda self, x: plain.append(self.p) or forward(self, x))
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        model(x).float().sum().backward()
    assert rates == [0.25, 0.25] and plain == [0.5]  # the dense layer's dropout stays a layer
    assert all(p.grad is not None for p in model.parameters())


@needs_kernels
def test_native_is_repeatable_and_passes_nan_on():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    outs = [bn_relu_pool(x.clone().requires_grad_(), random_bn(8, 3)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    x[1, 2, 3, 3] = float("nan")  # a NaN poisons its channel's statistics, so its outputs are NaN
    y = bn_relu_pool(x.requires_grad_(), random_bn(8, 3))
    assert y[:, 2].isnan().all() and not y[:, :2].isnan().any()


@needs_kernels
def test_native_runs_inside_net_in_bfloat16_and_matches_the_fallback(monkeypatch):
    torch.manual_seed(0)
    model = build_model(PRESETS["pool-bn"].layers, 10).to(memory_format=torch.channels_last)
    x = torch.rand(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    original = kernels.BNReLUPool2Native.forward
    monkeypatch.setattr(kernels.BNReLUPool2Native, "forward",
                        staticmethod(lambda ctx, *a: calls.append(a[0].dtype) or original(ctx, *a)))

    def step():
        model.load_state_dict(state)
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            loss = model(x.clone().requires_grad_()).float().logsumexp(1).mean()
        loss.backward()
        return loss.item(), model[0].weight.grad.clone()

    native = step()
    assert calls == [torch.bfloat16, torch.bfloat16]  # both blocks, in bfloat16 under autocast
    monkeypatch.setenv("CNNLAB_NATIVE", "0")
    fallback = step()
    assert len(calls) == 2  # switched off: the stock layers ran
    assert native[0] == pytest.approx(fallback[0], rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(native[1].flatten(), fallback[1].flatten(), dim=0)
    assert cos > 0.98


def _gelu_reference(x, bn, grad, pool):
    """(MaxPool2d(2) ->) BatchNorm2d -> GELU as stock layers in float64: output, gradients, state."""
    ref_bn = nn.BatchNorm2d(bn.num_features, momentum=bn.momentum, eps=bn.eps).double()
    ref_bn.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in bn.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    y = nn.Sequential(*([nn.MaxPool2d(2)] if pool else []), ref_bn, nn.GELU())(x64)
    y.backward(grad.double())
    return y.detach(), x64.grad, ref_bn.weight.grad, ref_bn.bias.grad, ref_bn.state_dict()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("shape,momentum,eps", [
    ((8, 16, 12, 12), 0.4, 1e-12),  # airbench's batch norm
    ((3, 5, 7, 9), None, 1e-5),     # odd sizes: the last row and column lie outside every window
    ((2, 3, 4, 2), 0.1, 1e-5),      # pooled, 4 values a channel
    ((4, 70, 6, 5), 0.1, 1e-5),     # more channels than one vector register holds
])
def test_native_bn_gelu_matches_stock_layers(dtype, pool, shape, momentum, eps):
    torch.manual_seed(2)
    x = (torch.randn(*shape) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, :, :2, :2] = 0.25  # a window of ties: the first position takes the gradient, as in PyTorch
    bn = random_bn(shape[1], 2, momentum)
    bn.eps = eps
    out_shape = (shape[0], shape[1], shape[2] // 2, shape[3] // 2) if pool else shape
    grad = torch.randn(*out_shape).to(dtype)  # rounded as the kernel takes it, so both see the same
    y_ref, dx_ref, dw_ref, db_ref, state_ref = _gelu_reference(x, bn, grad, pool)
    xn = x.clone().requires_grad_()
    y = bn_gelu(xn, bn, pool)
    y.backward(grad)
    assert y.dtype == dtype and y.shape == out_shape and y.is_contiguous(memory_format=torch.channels_last)
    assert xn.grad.dtype == dtype and xn.grad.is_contiguous(memory_format=torch.channels_last)
    if pool and shape[2] % 2:
        assert (xn.grad[:, :, -1] == 0).all()  # outside every window: no gradient
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(y.detach().double(), y_ref, rtol=tol, atol=tol * float(y_ref.abs().max()))
    torch.testing.assert_close(xn.grad.double(), dx_ref, rtol=tol, atol=tol * float(dx_ref.abs().max()))
    for got, want in ((bn.weight.grad, dw_ref), (bn.bias.grad, db_ref)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    for key, value in state_ref.items():
        torch.testing.assert_close(bn.state_dict()[key].double() if value.is_floating_point() else bn.state_dict()[key],
                                   value, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_native_bn_gelu_passes_nan_on_even_from_a_value_the_pooling_drops():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    outs = [bn_gelu(x.clone().requires_grad_(), random_bn(8, 3), pool=True) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    x[1, 2, 2:4, 2:4] = torch.tensor([[5.0, float("nan")], [1.0, 2.0]])  # the window's max is 5, not the NaN
    y = bn_gelu(x.requires_grad_(), random_bn(8, 3), pool=True)
    assert y[:, 2].isnan().all() and not y[:, :2].isnan().any()  # as in PyTorch, the NaN reaches the loss


@needs_kernels
@pytest.mark.parametrize("preset", ["fast", "airbench94"])
def test_the_airbench_presets_run_their_blocks_natively_and_match_the_stock_layers(monkeypatch, preset):
    torch.manual_seed(0)
    model = build_model(PRESETS[preset].layers, 10).to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    original = kernels.BNGELUNative.forward
    monkeypatch.setattr(kernels.BNGELUNative, "forward",
                        staticmethod(lambda ctx, *a: calls.append((a[0].dtype, a[-1])) or original(ctx, *a)))

    def step(dtype):
        model.load_state_dict(state)
        model.zero_grad()
        with torch.autocast("cpu", dtype, enabled=dtype == torch.bfloat16):
            loss = model(x.clone().requires_grad_()).float().logsumexp(1).mean()
        loss.backward()
        conv = next(m for m in model if type(m) is nn.Conv2d)
        return loss.item(), conv.weight.grad.clone(), {k: v.clone() for k, v in model.state_dict().items()}

    native = {dtype: step(dtype) for dtype in (torch.float32, torch.bfloat16)}
    # three groups, each conv -> pool -> bn -> gelu then conv -> bn -> gelu, in both precisions
    assert calls == [(dtype, pool) for dtype in (torch.float32, torch.bfloat16) for pool in (True, False) * 3]
    monkeypatch.setenv("CNNLAB_NATIVE", "0")
    for dtype, (loss, grad, after) in native.items():
        stock_loss, stock_grad, stock_after = step(dtype)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert loss == pytest.approx(stock_loss, rel=tol)
        for key, value in stock_after.items():  # the running statistics moved alike
            torch.testing.assert_close(after[key], value, rtol=tol, atol=tol)
        if dtype == torch.float32:
            torch.testing.assert_close(grad, stock_grad, rtol=tol, atol=tol * float(stock_grad.abs().max()))
        else:  # bfloat16 convolutions' rounding moves this net's first gradients by about a fifth either way
            assert torch.nn.functional.cosine_similarity(grad.flatten(), stock_grad.flatten(), dim=0) > 0.9
    assert len(calls) == 12  # switched off: the stock layers ran


@needs_kernels
def test_native_bn_gelu_in_bfloat16_is_closer_to_float64_than_the_stock_layers():
    """Each block rounds once, at its output, where the stock layers round after each layer."""
    torch.manual_seed(0)
    x = (torch.randn(64, 32, 16, 16) * 0.5 + 0.2).bfloat16().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(64, 32, 8, 8).bfloat16()
    bn = random_bn(32, 1, momentum=0.4)

    def run(kind):
        b = nn.BatchNorm2d(32, momentum=0.4)
        b.load_state_dict(bn.state_dict())
        xx = (x.double() if kind == "float64" else x).detach().clone().requires_grad_()
        b = b.double() if kind == "float64" else b
        y = bn_gelu(xx, b, pool=True) if kind == "native" else nn.Sequential(nn.MaxPool2d(2), b, nn.GELU())(xx)
        y.backward(grad.to(y.dtype))
        return y.detach().double(), xx.grad.double()

    exact, stock, native = run("float64"), run("stock"), run("native")
    for i in range(2):  # output, input gradient
        error = {name: float((got[i] - exact[i]).norm() / exact[i].norm()) for name, got in
                 (("stock", stock), ("native", native))}
        assert error["native"] < error["stock"] < 2 ** -7, error


def test_switched_off_training_uses_pytorch_kernels(monkeypatch):
    monkeypatch.setenv("CNNLAB_NATIVE", "0")
    assert kernels.library() is None and kernels.status() == "off (CNNLAB_NATIVE=0)"
    assert environment(torch.device("cpu"), kernel_status=kernels.status)["native_kernels"] == "off (CNNLAB_NATIVE=0)"
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    bn = random_bn(3, 0)
    assert not kernels.supports(x, bn)
    used = []
    monkeypatch.setattr(BNReLUPool2, "apply", lambda *a: used.append(1) or torch.zeros(4, 3, 4, 4))
    bn_relu_pool(x.requires_grad_(), bn)  # float32: cnnlab's fused PyTorch version
    assert used == [1]
    net = Net(nn.Conv2d(3, 4, 3, padding=1), random_bn(4, 0), nn.ReLU(), nn.MaxPool2d(2))
    with torch.autocast("cpu", torch.bfloat16):
        y = net(torch.randn(2, 3, 8, 8, requires_grad=True))  # bfloat16: the stock layers
    assert y.shape == (2, 4, 4, 4) and used == [1]


@needs_kernels
def test_build_compiles_once_then_reuses(tmp_path):
    compiler = kernels.find_compiler()
    path, note = kernels.build(tmp_path, compiler)
    assert path is not None and path.exists() and note.startswith("built"), note
    assert "-march=native" in note
    mtime = path.stat().st_mtime_ns
    again, note = kernels.build(tmp_path, compiler)
    assert again == path and note.startswith("cached") and path.stat().st_mtime_ns == mtime
    # the library and its manifest (cache.py), no temporary left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".json"]


def test_build_without_a_working_compiler_says_why(tmp_path):
    assert kernels.build(tmp_path, None)[0] is None
    assert "no C++ compiler" in kernels.build(tmp_path, str(tmp_path / "missing-c++"))[1]
    broken = tmp_path / "broken-c++"  # answers --version, fails to compile
    broken.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\n"
                      "echo 'error: cannot compile' >&2; exit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    cache = tmp_path / "cache"
    path, note = kernels.build(cache, str(broken))
    assert path is None and "could not build it: error: cannot compile" in note
    assert not list(cache.glob("*.so"))
