"""The fused batch norm -> ReLU -> 2x2 max-pool computes what the three stock layers compute."""
import pytest
import torch
from torch import nn

from cnnlab.layers import Dropout, Net, bn_relu_pool
from cnnlab.presets import PRESETS, build_model
from conftest import random_bn


@pytest.mark.parametrize("shape,channels_last,momentum", [
    ((6, 5, 8, 8), True, 0.1),
    ((6, 5, 8, 8), False, 0.1),
    ((3, 4, 7, 9), True, None),   # odd sizes: pooling drops the last row/column, statistics do not
    ((2, 3, 2, 2), False, 0.3),
])
def test_fused_matches_stock_layers_in_float64(shape, channels_last, momentum):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64)
    x[:, :, :4, :4] = 0.25  # whole windows of ties, as a black image region gives
    x[0, :, 0, 1] = -3.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    stock_bn, fused_bn = random_bn(shape[1], 2, momentum, torch.float64), random_bn(shape[1], 2, momentum, torch.float64)
    assert (fused_bn.weight < 0).any() and (fused_bn.weight > 0).any()
    stock = nn.Sequential(stock_bn, nn.ReLU(), nn.MaxPool2d(2))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    for _ in range(2):  # twice: running statistics and num_batches_tracked accumulate the same
        y1, y2 = stock(x1), bn_relu_pool(x2, fused_bn)
        grad = torch.randn_like(y1)
        (y1 * grad).sum().backward()
        (y2 * grad).sum().backward()
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused_bn.weight.grad, stock_bn.weight.grad, rtol=0, atol=1e-11)
    torch.testing.assert_close(fused_bn.bias.grad, stock_bn.bias.grad, rtol=0, atol=1e-11)
    for key, value in stock_bn.state_dict().items():
        torch.testing.assert_close(fused_bn.state_dict()[key], value, rtol=0, atol=1e-12)
    assert y2.shape == y1.shape
    assert x2.grad.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_net_is_a_sequential_with_the_same_keys_and_outputs():
    torch.manual_seed(0)
    fused = build_model(PRESETS["dropout"].layers, 10).to(memory_format=torch.channels_last)
    stock = nn.Sequential(*[nn.Identity() if isinstance(m, Dropout) else m for m in fused])
    assert isinstance(fused, Net) and isinstance(fused, nn.Sequential)
    x = torch.rand(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused.eval()
        assert torch.equal(fused(x), stock.eval()(x))  # not training: stock layers, ReLU after pooling
    fused.train()
    for layer in fused:
        if isinstance(layer, Dropout):
            layer.p = 0.0
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    out_fused = fused(x.requires_grad_())
    after_fused = {k: v.clone() for k, v in fused.state_dict().items()}
    fused.load_state_dict(before)
    out_stock = stock.train()(x)
    torch.testing.assert_close(out_fused, out_stock, rtol=1e-4, atol=1e-5)
    for key, value in fused.state_dict().items():  # running statistics updated alike
        torch.testing.assert_close(after_fused[key], value, rtol=1e-5, atol=1e-6)


def test_net_falls_back_when_the_pattern_or_input_does_not_fit():
    torch.manual_seed(0)
    net = Net(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(3))  # 3x3 pooling: not fused
    x = torch.randn(4, 3, 9, 9, requires_grad=True)
    reference = nn.Sequential(*net)
    torch.testing.assert_close(net(x), reference(x))
    net = Net(nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2))
    with torch.no_grad():  # no gradients needed: the stock layers run
        torch.testing.assert_close(net(x), nn.Sequential(*net)(x))


@pytest.mark.parametrize("channels_last", [True, False])
def test_net_lays_its_input_out_like_its_weights(channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = build_model(PRESETS["conv"].layers, 10).to(memory_format=layout)
    seen = []
    net[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)  # as batches come
    out = net(x)
    assert seen[0].is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, net(x.contiguous()))


def test_conv_preset_trains_in_nchw_and_the_others_channels_last():
    from cnnlab.presets import resolve_config
    assert resolve_config("conv", data="-").channels_last is False
    assert all(resolve_config(name, data="-").channels_last for name in PRESETS if name != "conv")


def test_relu_after_pooling_is_bit_identical_to_relu_before(monkeypatch):
    """Where the fused step does not run (bfloat16 activations without the native kernels,
    evaluation, GPUs), Net pools before the ReLU: the same values and gradients, bit for bit,
    with the ReLU on a quarter."""
    monkeypatch.setenv("CNNLAB_NATIVE", "0")
    torch.manual_seed(0)
    net = Net(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
              nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).to(memory_format=torch.channels_last)
    stock = nn.Sequential(*net)
    x = torch.randn(6, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    results = []
    for model in (net, stock):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        results.append((out.detach().clone(), [p.grad.clone() for p in model.parameters()]))
    (out_net, grads_net), (out_stock, grads_stock) = results
    assert torch.equal(out_net, out_stock)
    assert all(torch.equal(a, b) for a, b in zip(grads_net, grads_stock))
