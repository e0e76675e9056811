"""airbench's pieces in cnnlab's loop (the airbench94 and speedrun presets): the triangle and linear
schedules, batch-norm biases at a scaled rate, Lookahead, alternating flips, the 6-view test-time
augmentation, a whitening bias that trains and then freezes, dirac-initialised convs, scale-free
batch norm, Muon."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.checkpoint import read_checkpoint
from cnnlab.data import alternate_flips
from cnnlab.errors import CnnlabError
from cnnlab.inference import augmented_logits
from cnnlab.layers import Whiten
from cnnlab.optimizer import Lookahead, Muon, lr_factor, make_optimizer, orthogonalize
from cnnlab.presets import build_model, get_preset, muon_recipe, resolve_config
from cnnlab.run_state import RunContext
from cnnlab.train import _start, fit_model

RATES = ("batch_size", "lr", "weight_decay", "bias_lr_scale", "head_lr_scale")  # what muon_recipe derives


def airbench94_config(folder, tmp_path, preset="airbench94", **overrides):
    settings = dict(data=str(folder), epochs=3, batch_size=16, whiten_bias_epochs=2, threads=1, precision="fp32",
                    tensorboard=False, out=str(tmp_path / "runs"))
    return resolve_config(preset, **{**settings, **overrides})


def test_triangle_schedule_is_airbench94s():
    assert lr_factor("triangle", 0, 100) == pytest.approx(0.2)
    assert lr_factor("triangle", 23, 100) == pytest.approx(1.0)
    assert lr_factor("triangle", 100, 100) == pytest.approx(0.07)
    assert lr_factor("triangle", 50, 100) > lr_factor("triangle", 80, 100)


def test_batch_norm_biases_get_the_scaled_rate_and_the_same_decay_per_step():
    cfg = resolve_config("airbench94", data="x")
    model = build_model(get_preset("airbench94").layers, 10)
    opt = make_optimizer(model, cfg, None)
    others, biases = opt.param_groups
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in biases["params"]} == {id(m.bias) for m in norms}  # scales are fixed at 1: not trained
    assert all(not m.weight.requires_grad for m in norms)
    assert biases["lr"] == pytest.approx(64 * others["lr"]) and others["lr"] == pytest.approx(1.5)
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(others["lr"] * others["weight_decay"])
    plain = make_optimizer(model, resolve_config("pool-bn", data="x"), None)
    assert len(plain.param_groups) == 1


def test_the_whitening_bias_joins_the_scaled_biases_only_where_the_recipe_says_so():
    def scaled(preset, **overrides):  # the whitening bias's rate over the run's base rate
        cfg = resolve_config(preset, data="x", **overrides)
        model = build_model(get_preset(preset).layers, 10)
        bias = next(m.bias for m in model.modules() if isinstance(m, Whiten)).requires_grad_()  # as _start sets it
        groups = make_optimizer(model, cfg, None).param_groups
        return next(g["lr"] for g in groups if any(p is bias for p in g["params"])) / cfg.lr
    assert scaled("airbench94") == pytest.approx(1.0)  # airbench94: the base rate
    assert scaled("airbench94", whiten_bias_scaled=True) == pytest.approx(64.0)
    assert scaled("speedrun") == pytest.approx(0.053 * 500 / 0.12)  # airbench94_muon: the biases' rate
    assert scaled("speedrun", whiten_bias_scaled=False) == pytest.approx(1.0)


def test_lookahead_pulls_the_average_towards_the_weights_every_fifth_step_and_sets_them_to_it():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    look = Lookahead(model, total_steps=10)
    with torch.no_grad():
        model.weight.fill_(3.0)
    look.after_step(4)  # not a fifth step: nothing happens
    assert model.weight.tolist() == [[3.0, 3.0]]
    look.after_step(5)
    decay = 0.95 ** 5 * 0.5 ** 3
    expected = 1.0 + (1 - decay) * 2.0
    assert model.weight[0, 0].item() == pytest.approx(expected) == look.ema[0][0, 0].item()
    with torch.no_grad():
        model.weight.fill_(0.0)
    look.finish()
    assert model.weight[0, 0].item() == pytest.approx(expected)


def test_alternating_flips_show_each_image_both_ways_round_in_two_epochs():
    base = torch.rand(100, generator=torch.Generator().manual_seed(0)) < 0.5
    index = torch.randperm(100)[:40]
    first, second, third = (alternate_flips(base, index, epoch) for epoch in (1, 2, 3))
    assert torch.equal(first, ~second) and torch.equal(first, third) and 5 < int(first.sum()) < 35


def test_six_view_test_time_augmentation_averages_mirrors_and_one_pixel_shifts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
        def mirror(v):
            return (model(v) + model(v.flip(3))) / 2
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        expected = mirror(x) / 2 + (mirror(padded[:, :, :8, :8]) + mirror(padded[:, :, 2:, 2:])) / 4
        assert torch.allclose(augmented_logits(model, x, 2), expected, atol=1e-6)
        assert torch.allclose(augmented_logits(model, x, 1), mirror(x), atol=1e-6)
        assert torch.equal(augmented_logits(model, x, 0), model(x))
        assert not torch.allclose(augmented_logits(model, x, 2), mirror(x), atol=1e-4)


def test_dirac_convs_pass_their_inputs_through_at_first():
    model = build_model(["conv4:nobias:dirac", "conv6:nobias:dirac"], 10, (3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        y = model[0](x)
        assert torch.allclose(y[:, :3], x, atol=1e-6)  # the first 3 filters copy the 3 input channels
        assert torch.allclose(model[1](y)[:, :4], y, atol=1e-6)
        assert not torch.allclose(y[:, 3], torch.zeros_like(y[:, 3]))  # the rest keep their random start


def test_batch_norm_options_set_momentum_eps_and_a_fixed_scale():
    bn = build_model(["bn:noscale:momentum=0.4:eps=1e-12"], 10)[0]
    assert (bn.momentum, bn.eps, bn.weight.requires_grad, bn.bias.requires_grad) == (0.4, 1e-12, False, True)
    flat = build_model(["flatten", "bn:noscale:momentum=0.4:eps=1e-12"], 10)[1]  # after flatten: over units
    assert isinstance(flat, nn.BatchNorm1d) and flat.num_features == 3 * 32 * 32
    assert (flat.momentum, flat.eps, flat.weight.requires_grad) == (0.4, 1e-12, False)
    with pytest.raises(CnnlabError, match="momentum=x is not a number"):
        build_model(["bn:momentum=x"], 10)


def test_the_whitening_bias_trains_for_its_epochs_then_freezes(tiny_folder, tmp_path):
    # without Lookahead, whose average goes on pulling every weight (frozen ones too, as airbench's)
    cfg = airbench94_config(tiny_folder, tmp_path, lookahead=False)
    device, splits, model = _start(cfg, get_preset("airbench94").layers, None)
    whiten = next(m for m in model.modules() if isinstance(m, Whiten))
    assert whiten.bias.requires_grad and not whiten.weight.requires_grad
    start_weight = whiten.weight.detach().clone()
    biases = [whiten.bias.detach().clone()]
    fit_model(model, splits, cfg, RunContext(device, log=lambda line: biases.append(whiten.bias.detach().clone())))
    assert not torch.equal(biases[0], biases[1]) and not torch.equal(biases[1], biases[2])  # epochs 1, 2 train it
    assert torch.equal(biases[2], biases[3])  # epoch 3: frozen
    assert torch.equal(whiten.weight, start_weight)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules()
               if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("preset", ["airbench94", "speedrun"])  # Lookahead's average; Muon's momentum
def test_a_run_resumed_after_an_epoch_ends_as_the_uninterrupted_run(tiny_folder, tmp_path, preset):
    cfg = airbench94_config(tiny_folder, tmp_path, name="whole", preset=preset)
    device, splits, whole = _start(cfg, get_preset(preset).layers, None)
    fit_model(whole, splits, cfg, RunContext(device, log=lambda line: None))

    class Stop(Exception):
        pass

    def stop_after_two(line):
        if line.startswith("epoch   2/"):
            raise Stop
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    device, splits, model = _start(cfg, get_preset(preset).layers, None)
    with pytest.raises(Stop):
        fit_model(model, splits, cfg, RunContext(device, run_dir, log=stop_after_two, checkpoints=True))
    state = read_checkpoint(run_dir / "checkpoint.pt")
    assert state["epoch"] == 2 and ("lookahead" in state) == (preset == "airbench94")
    device, splits, resumed = _start(cfg, get_preset(preset).layers, None)
    fit_model(resumed, splits, cfg, RunContext(device, log=lambda line: None), state)
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_orthogonalize_squeezes_the_singular_values_towards_one():
    torch.manual_seed(0)
    for shape in ((64, 216), (300, 40)):
        u, _, v = torch.linalg.svd(torch.randn(*shape), full_matrices=False)
        g = u @ torch.diag(torch.logspace(-1, 1, min(shape))) @ v  # singular values 0.1 to 10: 100x
        s = torch.linalg.svdvals(orthogonalize(g).float())
        assert orthogonalize(g).shape == g.shape and float(s.max()) < 1.6 and float(s.max() / s.min()) < 10


def test_muon_orthogonalizes_in_the_runs_dtype_and_float32_follows_the_exact_iteration():
    """airbench's bfloat16 where the run computes in it; float32 where bfloat16 would be emulated
    (a CPU without AVX512-BF16 or AMX), which runs the same iteration to float32's precision."""
    model = build_model(get_preset("speedrun").layers, 10)
    cfg = resolve_config("speedrun", data="x")
    assert make_optimizer(model, cfg, None).dtype == torch.float32
    assert make_optimizer(model, cfg, torch.bfloat16).dtype == torch.bfloat16
    torch.manual_seed(0)
    g = torch.randn(64, 576)
    exact = orthogonalize(g.double(), dtype=torch.float64)
    assert (orthogonalize(g, dtype=torch.float32) - exact).abs().max() < 1e-5
    assert (orthogonalize(g) - exact).abs().max() > 1e-3  # bfloat16's 8 bits of mantissa
    fp32 = torch.linalg.svdvals(orthogonalize(g, dtype=torch.float32))
    assert float(fp32.max()) < 1.6 and float(fp32.min()) > 0.3


def test_muon_steps_filters_along_their_orthogonalized_momentum_and_the_rest_as_sgd():
    torch.manual_seed(0)
    conv, head = nn.Conv2d(3, 8, 3, bias=False), nn.Linear(8, 2)
    twin = nn.Linear(8, 2)
    twin.load_state_dict(head.state_dict())
    opt = Muon([{"params": [conv.weight], "orthogonal": True, "weight_decay": 0.0},
                {"params": list(head.parameters())}], lr=0.1, momentum=0.85, weight_decay=0.01)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    buf = None
    for _ in range(3):
        g = torch.randn_like(conv.weight)
        conv.weight.grad = g.clone()
        for mine, theirs in zip(head.parameters(), twin.parameters()):
            mine.grad = torch.randn_like(mine)
            theirs.grad = mine.grad.clone()
        buf = g if buf is None else Muon.MOMENTUM * buf + g
        with torch.no_grad():
            expected = conv.weight * (8 ** 0.5 / conv.weight.norm()) \
                - 0.1 * orthogonalize((g + Muon.MOMENTUM * buf).reshape(8, -1)).view(g.shape)
        opt.step(), sgd.step()
        assert torch.allclose(conv.weight, expected, atol=1e-5)
        s = torch.linalg.svdvals(orthogonalize((g + Muon.MOMENTUM * buf).reshape(8, -1)))
        assert float(s.max()) < 1.6 and float(s.min()) > 0.3  # an orthogonalized step: every direction alike
    for mine, theirs in zip(head.parameters(), twin.parameters()):
        assert torch.allclose(mine, theirs, atol=1e-6)  # the other groups: torch's SGD, Nesterov


def test_the_muon_recipe_groups_filters_biases_and_head_at_their_rates():
    published = muon_recipe(2000, 0.24)  # airbench94_muon as it runs on a GPU
    cfg = resolve_config("speedrun", data="x", **{k: published[k] for k in RATES})
    model = build_model(get_preset("speedrun").layers, 10)
    next(m for m in model.modules() if isinstance(m, Whiten)).bias.requires_grad_(True)  # as train._start does
    groups = make_optimizer(model, cfg, None).param_groups
    filters = [g for g in groups if g["orthogonal"]]
    convs = [m.weight for m in model.modules() if type(m) is nn.Conv2d]  # the whitening conv is frozen
    assert len(filters) == 1 and {id(p) for p in filters[0]["params"]} == {id(p) for p in convs}
    by_lr = {round(g["lr"], 6): g for g in groups if not g["orthogonal"]}
    assert sorted(by_lr) == [106.0, 1340.0]
    assert len(by_lr[106.0]["params"]) == 6 + 1  # six batch-norm biases and the whitening bias
    assert all(g["lr"] * g["weight_decay"] == pytest.approx(0.004) for g in by_lr.values())
    head = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert float(head.weight.detach().std()) == pytest.approx(1.0, rel=1e-4)
    assert lr_factor("linear", 0, 10) == 1.0 and lr_factor("linear", 5, 10) == 0.5 and lr_factor("linear", 10, 10) == 0


@pytest.mark.parametrize("preset", ["fast", "speedrun"])
def test_the_cpu_presets_take_airbench94_muons_rates_per_image_at_a_batch_of_500(preset):
    cfg = resolve_config(preset, data="x")
    assert (cfg.batch_size, cfg.lr) == (500, 0.12)
    groups = [g for g in make_optimizer(build_model(get_preset(preset).layers, 10), cfg, None).param_groups
              if not g["orthogonal"]]
    per_image = sorted(round(g["lr"] / cfg.batch_size, 6) for g in groups)  # a mean loss's rate per image
    assert per_image == [0.053, 0.67]  # airbench94_muon's biases and head (it sums the loss), as published above
    assert all(g["lr"] * g["weight_decay"] == pytest.approx(2e-6 * cfg.batch_size) for g in groups)


def test_a_run_recorded_before_whiten_bias_scaled_existed_is_one_line_asking_to_train_it_again():
    from dataclasses import asdict

    from cnnlab.config import TrainConfig, from_record
    for preset in ("speedrun", "airbench94"):
        record = asdict(resolve_config(preset, data="x"))
        assert from_record(TrainConfig, record) == resolve_config(preset, data="x")
        del record["whiten_bias_scaled"]
        with pytest.raises(CnnlabError, match="config.json has no whiten_bias_scaled: an older cnnlab wrote it"):
            from_record(TrainConfig, record)
