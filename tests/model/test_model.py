"""AlexNet: shapes, parameter count, neon init, LRN formula, memory formats, optimizer groups."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alexnet_pipe.model.alexnet import (
    MIN_CROP,
    AlexNet,
    AlexNetConfig,
    fc6_in_features,
    init_weights,
    pool5_size,
)
from alexnet_pipe.model.params import count_parameters, param_groups

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
WEIGHT_STD = {"conv1": 0.01, "conv2": 0.01, "conv3": 0.01, "conv4": 0.01, "conv5": 0.01,
              "fc6": 0.005, "fc7": 0.005, "fc8": 0.01}
BIAS = {"conv1": 0.0, "conv2": 1.0, "conv3": 0.0, "conv4": 1.0, "conv5": 1.0,
        "fc6": 1.0, "fc7": 1.0, "fc8": 0.0}


def images(n: int, *chw: int, seed: int = 0) -> torch.Tensor:
    """Seeded inputs, so results don't depend on test order through the global RNG."""
    return torch.randn(n, *chw, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: on a busy 2-core runner, intra-op threads cost ~5x more than
    they save (measured 250 ms vs 40 ms per batch-2 forward at 112). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def net224() -> AlexNet:
    """The full ImageNet network at neon's 224 crop, built once (construction dominates)."""
    return AlexNet(AlexNetConfig(num_classes=1000), generator=torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def net112() -> AlexNet:
    return AlexNet(AlexNetConfig(num_classes=7, crop=112), generator=torch.Generator().manual_seed(1)).eval()


def test_layer_shapes_at_224(net224):
    seen = {}
    hooks = [getattr(net224, name).register_forward_hook(
                 lambda m, i, o, name=name: seen.__setitem__(name, (tuple(i[0].shape), tuple(o.shape))))
             for name in ("conv1", "pool1", "norm1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6")]
    try:
        with torch.no_grad():
            logits = net224(images(2, 3, 224, 224))
    finally:
        for h in hooks:
            h.remove()
    out = {name: o for name, (_, o) in seen.items()}
    assert out["conv1"] == (2, 96, 54, 54)
    assert out["pool1"] == out["norm1"] == (2, 96, 26, 26)
    assert out["conv2"] == (2, 256, 26, 26)
    assert out["pool2"] == (2, 256, 12, 12)
    assert out["conv3"] == out["conv4"] == (2, 384, 12, 12)
    assert out["conv5"] == (2, 256, 12, 12)
    assert out["pool5"] == (2, 256, 5, 5)
    assert seen["fc6"][0] == (2, 6400)
    assert logits.shape == (2, 1000)


def test_fc6_in_features():
    assert fc6_in_features(224) == 256 * 5 * 5 == 6400
    assert fc6_in_features(227) == 256 * 6 * 6 == 9216
    assert fc6_in_features(112) == 256 * 2 * 2 == 1024
    assert pool5_size(MIN_CROP) == 1 and pool5_size(MIN_CROP - 1) == 0
    # 66 -> conv1 14 -> pool1 6 -> pool2 2 -> pool5 nothing; 67 -> 15 -> 7 -> 3 -> 1
    assert MIN_CROP == 67
    with pytest.raises(ValueError, match="smallest crop is 67"):
        fc6_in_features(66)


def test_fc6_fan_in_follows_crop(net112):
    assert net112.fc6.in_features == 1024
    with torch.no_grad():
        feats = net112.features(images(1, 3, 112, 112))
        logits = net112(images(3, 3, 112, 112))
    assert feats.shape == (1, 256, 2, 2)
    assert logits.shape == (3, 7)


def test_forward_rejects_wrong_input_size(net112):
    with pytest.raises(ValueError, match=r"N x 3 x 112 x 112.*crop"):
        net112(images(1, 3, 224, 224))


def test_parameter_count_full_imagenet(net224):
    # weights (out * in * kh * kw) + biases (out), layer by layer, at the 224 crop
    conv1 = 96 * 3 * 11 * 11 + 96          # 34,944
    conv2 = 256 * 96 * 5 * 5 + 256         # 614,656 (ungrouped: all 96 inputs)
    conv3 = 384 * 256 * 3 * 3 + 384        # 885,120
    conv4 = 384 * 384 * 3 * 3 + 384        # 1,327,488
    conv5 = 256 * 384 * 3 * 3 + 256        # 884,992
    fc6 = 4096 * (256 * 5 * 5) + 4096      # 26,218,496
    fc7 = 4096 * 4096 + 4096               # 16,781,312
    fc8 = 1000 * 4096 + 1000               # 4,097,000
    expected = conv1 + conv2 + conv3 + conv4 + conv5 + fc6 + fc7 + fc8
    assert expected == 50_844_008
    assert net224.cfg.num_classes == 1000
    assert count_parameters(net224) == expected
    keys = [f"{name}.{kind}" for name in LAYERS for kind in ("weight", "bias")]
    assert list(net224.state_dict()) == keys


def test_init_statistics(net224):
    for name in LAYERS:
        layer = getattr(net224, name)
        w = layer.weight.detach()
        std, mean = torch.std_mean(w)
        target = WEIGHT_STD[name]
        assert std.item() == pytest.approx(target, rel=0.05), name
        # the sample mean of n draws has std target / sqrt(n); allow 5 of those
        assert abs(mean.item()) < 5 * target / w.numel() ** 0.5, name
        assert torch.equal(layer.bias.detach(), torch.full_like(layer.bias, BIAS[name])), name


def test_init_is_reproducible_with_a_generator():
    cfg = AlexNetConfig(num_classes=5, crop=MIN_CROP)  # fc6 has only 256 inputs: fast
    rng_before = torch.get_rng_state()
    a = AlexNet(cfg, generator=torch.Generator().manual_seed(42))
    b = AlexNet(cfg, generator=torch.Generator().manual_seed(42))
    assert torch.equal(torch.get_rng_state(), rng_before)  # global stream untouched
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    init_weights(b, torch.Generator().manual_seed(43))
    for name in LAYERS:
        assert not torch.equal(getattr(a, name).weight, getattr(b, name).weight), name
    # re-initialising in place with the first seed brings the weights back
    init_weights(b, torch.Generator().manual_seed(42))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def caffe_lrn(x: np.ndarray, size=5, alpha=1e-4, beta=0.75, k=1.0) -> np.ndarray:
    """Caffe's ACROSS_CHANNELS LRN: x_i / (k + alpha/size * sum_{|j-i|<=size//2} x_j^2)^beta."""
    half = size // 2
    channels = x.shape[1]
    out = np.empty_like(x)
    for i in range(channels):
        lo, hi = max(0, i - half), min(channels, i + half + 1)
        scale = k + alpha / size * (x[:, lo:hi] ** 2).sum(axis=1)
        out[:, i] = x[:, i] / scale**beta
    return out


def test_lrn_matches_caffe_formula(net224):
    rng = np.random.default_rng(0)
    # large values so the normaliser is far from 1 (at unit scale the LRN is ~identity)
    x = (rng.standard_normal((2, 11, 4, 3)) * 300).astype(np.float64)
    expected = caffe_lrn(x)
    assert np.abs(expected - x).max() > 0.1 * np.abs(x).max()
    for norm in (net224.norm1, net224.norm2):
        got = norm(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_features_follow_caffenet_order(net112):
    """pool before LRN, ReLU after every conv: a hand-written forward agrees."""
    m = net112
    x = images(2, 3, 112, 112)
    lrn = dict(size=5, alpha=1e-4, beta=0.75, k=1.0)
    with torch.no_grad():
        h = F.local_response_norm(F.max_pool2d(F.relu(F.conv2d(x, m.conv1.weight, m.conv1.bias, stride=4)), 3, 2),
                                  **lrn)
        h = F.local_response_norm(F.max_pool2d(F.relu(F.conv2d(h, m.conv2.weight, m.conv2.bias, padding=2)), 3, 2),
                                  **lrn)
        h = F.relu(F.conv2d(h, m.conv3.weight, m.conv3.bias, padding=1))
        h = F.relu(F.conv2d(h, m.conv4.weight, m.conv4.bias, padding=1))
        pool5 = F.max_pool2d(F.relu(F.conv2d(h, m.conv5.weight, m.conv5.bias, padding=1)), 3, 2)
        feats = m.features(x)
        h = F.relu(F.linear(torch.flatten(pool5, 1), m.fc6.weight, m.fc6.bias))
        h = F.relu(F.linear(h, m.fc7.weight, m.fc7.bias))
        logits = F.linear(h, m.fc8.weight, m.fc8.bias)
        got = m(x)
    torch.testing.assert_close(feats, pool5)
    torch.testing.assert_close(got, logits)


def test_dropout_only_in_train_mode(net112):
    x = images(2, 3, 112, 112)
    assert net112.drop6.p == net112.drop7.p == net112.cfg.dropout == 0.5
    try:
        with torch.no_grad():
            assert torch.equal(net112(x), net112(x))
            net112.train()
            torch.manual_seed(0)
            assert not torch.equal(net112(x), net112(x))
    finally:
        net112.eval()  # the fixture is shared


def test_channels_last_matches_contiguous(net112):
    x = images(2, 3, 112, 112)
    with torch.no_grad():
        ref = net112(x)
        cl_model = copy.deepcopy(net112).to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        assert x_cl.is_contiguous(memory_format=torch.channels_last)
        assert cl_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        got = cl_model(x_cl)
        got_input_only = net112(x_cl)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_input_only, ref, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_forward_is_finite(net112):
    x = images(2, 3, 112, 112)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net112(x)
    assert logits.dtype == torch.bfloat16
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits.float()).all()
    with torch.no_grad():
        ref = net112(x)
    # bf16 keeps ~3 significant digits; the logits should still be close
    torch.testing.assert_close(logits.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_param_groups(net112):
    groups = param_groups(net112, lr=0.01, weight_decay=5e-4)
    assert [g["name"] for g in groups] == ["weights", "biases"]
    weights, biases = groups
    assert weights["lr"] == weights["lr0"] == 0.01
    assert biases["lr"] == biases["lr0"] == pytest.approx(0.02)
    assert weights["weight_decay"] == 5e-4 and biases["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(net112.parameters()))
    assert {id(getattr(net112, n).bias) for n in LAYERS} == {id(p) for p in biases["params"]}
    assert all(p.dim() > 1 for p in weights["params"])
    with pytest.raises(ValueError, match="lr"):
        param_groups(net112, lr=-1.0, weight_decay=0.0)


def test_config_validation():
    with pytest.raises(ValueError, match=r"crop must be >= 67"):
        AlexNetConfig(crop=66)
    AlexNetConfig(crop=67)  # the smallest allowed
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        AlexNetConfig(num_classes=0)
    with pytest.raises(ValueError, match="dropout"):
        AlexNetConfig(dropout=1.0)
    with pytest.raises(TypeError, match="num_classes"):
        AlexNetConfig(num_classes=10.0)
    with pytest.raises(TypeError, match="AlexNetConfig"):
        AlexNet({"num_classes": 10})


def test_config_round_trip():
    cfg = AlexNetConfig(num_classes=17, crop=227, dropout=0.25)
    d = cfg.to_dict()
    assert d == {"num_classes": 17, "crop": 227, "dropout": 0.25}
    assert AlexNetConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert AlexNetConfig.from_dict({}) == AlexNetConfig()
    with pytest.raises(ValueError, match="unknown AlexNetConfig keys.*'groups'"):
        AlexNetConfig.from_dict({**d, "groups": 2})


def test_kaiming_init_is_he_normal_with_zero_biases():
    from alexnet_pipe.model.alexnet import AlexNet, AlexNetConfig

    model = AlexNet(AlexNetConfig(num_classes=10, crop=67), generator=torch.Generator().manual_seed(0), init="kaiming")
    conv2 = model.conv2.weight
    assert conv2.std().item() == pytest.approx((2.0 / (256 * 5 * 5)) ** 0.5, rel=0.02)
    assert model.fc7.weight.std().item() == pytest.approx(0.01, rel=0.02)
    for name in ("conv1", "conv2", "conv4", "fc6", "fc7", "fc8"):
        assert torch.count_nonzero(getattr(model, name).bias).item() == 0
    with pytest.raises(ValueError, match="init scheme"):
        AlexNet(AlexNetConfig(num_classes=10, crop=67), init="xavier")


# --- speed options that must not change the network (issue 19: conv1 with 4 channels, the LRN) ---

LRN_ARGS = dict(size=5, alpha=1e-4, beta=0.75, k=1.0)


def _lrn_pair(impl: str, x: torch.Tensor, grad: torch.Tensor):
    """(output, input gradient) of nn.LocalResponseNorm and of LRN(impl) on the same input."""
    from alexnet_pipe.model.lrn import LRN

    out = []
    for norm in (torch.nn.LocalResponseNorm(**LRN_ARGS), LRN(**LRN_ARGS, impl=impl, backend="aot_eager")):
        xi = x.detach().clone().requires_grad_()
        y = norm(xi)
        y.backward(grad)
        out.append((y.detach(), xi.grad))
    return out


@pytest.mark.parametrize("impl", ["sum", "compiled"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_implementations_compute_torchs_lrn(impl, channels_last):
    """The shifted-sum LRN and the compiled one are nn.LocalResponseNorm: forward and backward,
    in float64 to 1e-12 (the same sum in another order), in float32 to rtol 1e-5 (measured: a few
    1e-7 relative), with the borders' zero padding, in either memory format (which "sum" keeps)."""
    if impl == "compiled":
        torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        # values large enough for the normaliser to matter (at unit scale LRN is ~identity)
        x = (torch.randn(3, 11, 5, 4, generator=gen, dtype=torch.float64) * 300).to(dtype)
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
        if channels_last:
            x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
        (ref, ref_grad), (got, got_grad) = _lrn_pair(impl, x, g)
        assert (ref - x).abs().max() > 0.1 * x.abs().max()
        torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * ref.abs().max().item())
        torch.testing.assert_close(got_grad, ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())
        if impl == "sum" and channels_last:
            assert got.is_contiguous(memory_format=torch.channels_last)
    if impl == "compiled":
        torch._dynamo.reset()


def test_lrn_sum_with_fewer_channels_than_the_window():
    from alexnet_pipe.model.lrn import lrn_shifted_sum

    x = torch.randn(2, 2, 3, 3, dtype=torch.float64) * 100
    torch.testing.assert_close(lrn_shifted_sum(x, **LRN_ARGS), F.local_response_norm(x, **LRN_ARGS), rtol=1e-12, atol=0)


def test_lrn_impl_is_a_choice_of_the_model_not_of_its_weights(net112):
    """The whole network with the shifted-sum LRN gives the same logits; the state_dict is unchanged."""
    from alexnet_pipe.model.lrn import LRN_IMPLS

    x = images(2, 3, 112, 112) * 50
    fast = copy.deepcopy(net112).set_fast_paths(lrn="sum")
    assert fast.norm1.impl == fast.norm2.impl == "sum" and "impl=sum" in repr(fast.norm1)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net112(x), rtol=1e-5, atol=1e-5 * net112(x).abs().max().item())
    assert fast.state_dict().keys() == net112.state_dict().keys()
    assert LRN_IMPLS == ("torch", "sum", "compiled")
    with pytest.raises(ValueError, match="LRN impl"):
        fast.set_fast_paths(lrn="fused")


def test_conv1_with_four_input_channels_is_the_same_network():
    """input_channels=4: conv1's stored weight stays 96x3x11x11 (a zero 4th filter plane is added
    in forward), so logits and every gradient equal the 3-channel model's, whatever the 4th
    channel holds, and weights load either way."""
    from alexnet_pipe.model.alexnet import INPUT_CHANNELS

    cfg = AlexNetConfig(num_classes=7, crop=67)
    three = AlexNet(cfg, generator=torch.Generator().manual_seed(3))
    four = AlexNet(cfg, generator=torch.Generator().manual_seed(0), input_channels=4)
    assert {k: v.shape for k, v in four.state_dict().items()} == {k: v.shape for k, v in three.state_dict().items()}
    assert four.state_dict()["conv1.weight"].shape == (96, 3, 11, 11)
    four.load_state_dict(three.state_dict())
    three.eval()
    four.eval()
    x = images(3, 3, 67, 67, seed=5) * 50
    for fourth in (torch.zeros(3, 1, 67, 67), images(3, 1, 67, 67, seed=6) * 50):  # DALI pads zeros; any value works
        for memory_format in (torch.contiguous_format, torch.channels_last):
            x4 = torch.cat([x, fourth], 1).contiguous(memory_format=memory_format)
            for m in (three, four):
                m.zero_grad()
                m(x.contiguous(memory_format=memory_format) if m is three else x4).square().sum().backward()
            with torch.no_grad():
                ref, got = three(x), four(x4)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
            for (name, p3), p4 in zip(three.named_parameters(), four.parameters()):
                torch.testing.assert_close(p4.grad, p3.grad, rtol=1e-4, atol=1e-5 * p3.grad.abs().max().item(),
                                           msg=name)
    with pytest.raises(ValueError, match="expected input N x 4 x 67 x 67"):
        four(x)
    assert INPUT_CHANNELS == (3, 4)
    with pytest.raises(ValueError, match="input_channels"):
        AlexNet(cfg, input_channels=5)


def test_fixed_batch_pads_a_partial_batch_and_slices_it_back():
    """FixedBatch (what train --compile runs): a partial batch gives the outputs and gradients of
    the unpadded batch, the module always sees the full batch, in the input's memory format."""
    from alexnet_pipe.model.compiled import FixedBatch

    net = AlexNet(AlexNetConfig(num_classes=5, crop=67), generator=torch.Generator().manual_seed(0)).eval()
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[0],
                                                                args[0].is_contiguous(memory_format=torch.channels_last))))
    wrapped = FixedBatch(net, 8)
    x = (images(3, 3, 67, 67) * 50).contiguous(memory_format=torch.channels_last)
    got = wrapped(x)
    got.sum().backward()
    grad = net.conv1.weight.grad.clone()
    net.zero_grad()
    ref = net(x)
    ref.sum().backward()
    assert got.shape == (3, 5) and seen[0] == (8, True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, net.conv1.weight.grad, rtol=1e-4, atol=1e-6)
    assert wrapped(images(8, 3, 67, 67)).shape == (8, 5)  # a full batch passes as it is
    inference = []
    net.register_forward_pre_hook(lambda m, args: inference.append(args[0].is_inference()))
    with torch.inference_mode():  # a batch made outside inference mode reaches it as an inference tensor
        wrapped(images(8, 3, 67, 67))
        wrapped(images(2, 3, 67, 67))
    assert inference == [True, True]
    wrapped.train()
    assert net.training
    with pytest.raises(ValueError, match="batch size"):
        FixedBatch(net, 0)
