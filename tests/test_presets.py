import pytest
import torch

from cnnlab.errors import CnnlabError
from cnnlab.presets import PRESETS, build_model, count_parameters, get_preset, init_whitening, summary_rows


def dense(i, o):
    return i * o + o


def conv(i, o):
    return 9 * i * o + o


EXPECTED_PARAMS = {
    "conv": conv(3, 32) + conv(32, 64) + dense(28 * 28 * 64, 128) + dense(128, 10),
    "pool-bn": conv(3, 32) + 64 + conv(32, 64) + 128 + dense(8 * 8 * 64, 128) + dense(128, 10),
    "dropout": conv(3, 32) + 64 + conv(32, 64) + 128 + dense(8 * 8 * 64, 128) + dense(128, 10),
}
EXPECTED_PARAMS["early-stop"] = EXPECTED_PARAMS["dropout"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_maps_a_cifar_batch_to_ten_logits(name):
    model = build_model(get_preset(name).layers, 10)
    model.eval()
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)


@pytest.mark.parametrize("name", EXPECTED_PARAMS)
def test_seed_presets_have_the_seed_studys_parameter_counts(name):
    assert count_parameters(build_model(get_preset(name).layers, 10)) == EXPECTED_PARAMS[name]


def test_seed_presets_are_the_seed_studys_layers():
    assert PRESETS["conv"].layers[:4] == ("conv32:valid", "relu", "conv64:valid", "relu")
    assert PRESETS["dropout"].layers.count("drop0.25") == 2 and "drop0.5" in PRESETS["dropout"].layers
    assert PRESETS["early-stop"].settings == {"epochs": 60, "monitor": "val_loss", "patience": 5}
    assert PRESETS["dropout"].settings["epochs"] == 60


def test_unknown_preset_is_a_one_line_error_listing_the_choices():
    with pytest.raises(CnnlabError, match="unknown preset 'nope'.*pool-bn"):
        get_preset("nope")


def test_summary_rows_track_output_shapes_and_parameters():
    model = build_model(get_preset("pool-bn").layers, 10)
    rows = summary_rows(model)
    assert rows[0] == ("conv2d_0", "(None, 32, 32, 32)", 896)
    assert rows[3][1] == "(None, 32, 16, 16)"
    assert sum(r[2] for r in rows) == EXPECTED_PARAMS["pool-bn"]


def test_whitening_layer_decorrelates_patches():
    torch.manual_seed(0)
    base = torch.randn(64, 3, 16, 16)
    images = base + 0.8 * base.roll(1, dims=1)  # correlated channels
    model = build_model(("whiten", "flatten", "dense"), 10, (3, 16, 16))
    init_whitening(model, images)
    out = model[0](images)  # (64, 24, 15, 15)
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(half.T)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert not model[0].weight.requires_grad


def test_dropout_layer_keeps_one_minus_p_and_rescales():
    from cnnlab.layers import Dropout
    torch.manual_seed(0)
    x = torch.rand(256, 16, 16, 16) + 0.5  # no zeros of its own
    for p in (0.25, 0.5):
        layer = Dropout(p).train()
        y = layer(x.contiguous(memory_format=torch.channels_last))
        kept = y != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 0.005
        assert torch.allclose(y[kept], x[kept] / (1 - p))
        per_channel = kept.float().mean((0, 2, 3))
        assert per_channel.min() > 1 - p - 0.02 and per_channel.max() < 1 - p + 0.02  # no layout bias
    assert torch.equal(Dropout(0.5).eval()(x), x)
    torch.manual_seed(1)
    a = Dropout(0.5).train()(x)
    torch.manual_seed(1)
    assert torch.equal(a, Dropout(0.5).train()(x))  # seeded: repeatable
    with pytest.raises(CnnlabError):
        Dropout(1.0)
