"""import-weights: neon pickles, Caffe caffemodels and torchvision state_dicts, written here from
shared/reference/WEIGHT_FORMATS.md with random values, each checked against a reference forward
pass of its own layout (not by re-running the importer's reshapes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from alexnet_pipe.cli import main
from alexnet_pipe.errors import FormatError, UnsafePickleError
from alexnet_pipe.formats.blobproto import encode_blobproto
from alexnet_pipe.model import checkpoint
from alexnet_pipe.model.alexnet import AlexNetConfig, build_model
from alexnet_pipe.model.inputspec import InputSpec
from alexnet_pipe.model.weights import ImportConfig, caffe, detect_format, import_weights, neon
from alexnet_pipe.model.weights.caffe import read_layers
from alexnet_pipe.model.weights.neon import read_params
from alexnet_pipe.safe_pickle import loads
from tests.helpers.pickle_samples import attack_pickles, neon_cache, neon_weights_pre12, neon_weights_v14, py2_pickle
from tests.helpers.weight_files import (
    CAFFE_CONVS,
    CLASSES,
    KEEP6,
    KEEP7,
    NEON_CONVS,
    TV_SHAPES,
    caffemodel,
    caffenet_layers,
    caffenet_weights,
    neon_arrays,
    neon_v14,
    randn,
    tv_state_dict,
)

pytestmark = pytest.mark.usefixtures("torch_threads")  # two threads, restored after

def load(path):
    """The weights file as a model (built on the meta device: its random init would cost a second)."""
    body = checkpoint.load(path)
    with torch.device("meta"):
        model = build_model(AlexNetConfig.from_dict(body["model_config"]))
    model.load_state_dict(body["model"], assign=True)
    return body, model.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = b.abs().max().item()
    assert scale > 1e-3  # the comparison means something
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------- neon

def neon_forward(x: torch.Tensor, arrays, keeps) -> torch.Tensor:
    """neon's inference in its own layouts: convolution as im2col rows (c, r, s) times W (C*R*S, K),
    linear as W @ x, dropout multiplying by keep."""
    def t(a):
        return torch.from_numpy(a.astype(np.float32))

    for name, _c, r, k, stride, pad in NEON_CONVS:
        w, b = arrays[name]
        n, _, h, _ = x.shape
        cols = F.unfold(x, r, padding=pad, stride=stride)  # (N, C*R*S, L), rows in (c, r, s) order
        side = (h + 2 * pad - r) // stride + 1
        x = F.relu((torch.einsum("nil,ik->nkl", cols, t(w)) + t(b).view(1, k, 1)).view(n, k, side, side))
        if name in ("conv1", "conv2", "conv5"):
            x = F.max_pool2d(x, 3, 2)
        if name in ("conv1", "conv2"):
            x = F.local_response_norm(x, 5, 1e-4, 0.75, 1.0)
    x = x.flatten(1)  # neon's (C, H, W, N) activations: fc6 input index c*H*W + h*W + w
    for name, keep in (("fc6", keeps[0]), ("fc7", keeps[1]), ("fc8", None)):
        w, b = arrays[name]
        x = x @ t(w).T + t(b).view(1, -1)
        if keep is not None:
            x = F.relu(x) * keep
    return x


@pytest.fixture(scope="module")
def neon_full():
    return neon_arrays()


def test_neon_import_matches_neon_forward(neon_full, tmp_path):
    keeps = (KEEP6, KEEP7)
    src = tmp_path / "alexnet.p"
    src.write_bytes(py2_pickle(neon_v14(neon_full)))
    result = import_weights(src, ImportConfig(output=tmp_path / "w.pt"))
    assert (result.arch, result.crop, result.num_classes) == ("neon", 224, CLASSES)
    body, model = load(tmp_path / "w.pt")
    assert body["data"]["channel_order"] == "BGR" and body["data"]["mean_rgb"] == [104.0, 119.0, 127.0]
    assert body["data"]["value_range"] == [0.0, 255.0] and body["data"]["std_rgb"] is None

    # conv1 by hand at one output position: W[c*R*S + r*S + s, k] * input[c, 4y + r, 4x + s]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 40
    w1, b1 = (a.astype(np.float64) for a in neon_full["conv1"])
    patch = x[0, :, 4 * 7:4 * 7 + 11, 4 * 9:4 * 9 + 11].double().numpy().reshape(-1)
    np.testing.assert_allclose(model.conv1(x)[0, :, 7, 9].double().detach().numpy(), patch @ w1 + b1[:, 0],
                               rtol=1e-4, atol=1e-3)
    # dropout: fc7 and fc8 weights scaled by the keep of the dropout feeding them; fc6 and biases not
    for name, keep in (("fc6", 1.0), ("fc7", keeps[0]), ("fc8", keeps[1])):
        w, b = (torch.from_numpy(a.astype(np.float32)) for a in neon_full[name])
        torch.testing.assert_close(model.state_dict()[f"{name}.weight"], w * keep)
        torch.testing.assert_close(model.state_dict()[f"{name}.bias"], b.view(-1))
    with torch.no_grad():
        close(model(x), neon_forward(x, neon_full, keeps))


def test_neon_pre12_layout_scales_fc7_fc8_by_the_published_keep(neon_full):
    """No layer list, so no Dropout layers to read: the published script's keep 0.5 before fc7 and fc8."""
    obj = {"layer_params_states": [{"params": a, "states": [np.zeros_like(a)]} for name in neon_full
                                   for a in neon_full[name]], "epoch_index": 89}
    imp = neon.convert(read_params(obj))
    assert imp.model_config == AlexNetConfig(num_classes=CLASSES, crop=224)
    for name, keep in (("conv2", 1.0), ("fc6", 1.0), ("fc7", 0.5), ("fc8", 0.5)):
        w = torch.from_numpy(neon_full[name][0].astype(np.float32))
        if name.startswith("conv"):
            w = w.T.reshape(imp.state_dict[f"{name}.weight"].shape)
        torch.testing.assert_close(imp.state_dict[f"{name}.weight"], w * keep)
        torch.testing.assert_close(imp.state_dict[f"{name}.bias"],
                                   torch.from_numpy(neon_full[name][1].astype(np.float32)).view(-1))


def test_neon_both_layouts_read_in_order():
    v14 = read_params(loads(py2_pickle(neon_weights_v14(seed=3))))
    old = read_params(loads(py2_pickle(neon_weights_pre12(seed=3))))
    assert (v14.layout, old.layout, v14.version) == ("v1.4", "pre-1.2", "1.4.0")
    assert len(v14.arrays) == len(old.arrays) == 16
    for a, b in zip(v14.arrays, old.arrays):
        np.testing.assert_array_equal(a, b)
    assert v14.dropouts == [(12, 0.5), (14, 0.5)] and old.dropouts is None


def test_neon_older_net_is_named_and_refused(tmp_path):
    rng = np.random.default_rng(0)
    convs = [(363, 64), (64 * 25, 192), (192 * 9, 384), (384 * 9, 256), (256 * 9, 256)]
    params = [a for s in convs for a in (randn(rng, s, s[0]), np.zeros((s[1], 1), np.float32))]
    params += [np.zeros((4096, 9216), np.float16)[:1], np.zeros((1, 1), np.float32)]  # fc shapes never reached
    src = tmp_path / "alexnet.p"
    src.write_bytes(py2_pickle({"layer_params_states": [{"params": p, "states": []} for p in params]}))
    with pytest.raises(FormatError, match="neon's older AlexNet .64-192-384-256-256"):
        import_weights(src, ImportConfig(output=tmp_path / "w.pt"))
    assert not (tmp_path / "w.pt").exists()


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    sentinel = tmp_path / "pwned"
    src = tmp_path / "alexnet.p"
    src.write_bytes(attack_pickles(str(sentinel))["os.system"][0])
    res = CliRunner().invoke(main, ["import-weights", str(src), "-o", str(tmp_path / "w.pt")])
    assert res.exit_code == 1 and "os.system" in res.output and "refusing" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not sentinel.exists() and not (tmp_path / "w.pt").exists()
    with pytest.raises(UnsafePickleError):
        import_weights(src, ImportConfig(output=tmp_path / "w.pt"))


def test_a_pickle_of_something_else_is_refused(tmp_path):
    src = tmp_path / "cache.pkl"
    src.write_bytes(py2_pickle(neon_cache()))
    with pytest.raises(FormatError, match="not a neon weights file"):
        import_weights(src, ImportConfig(output=tmp_path / "w.pt"))


# ---------------------------------------------------------------- Caffe

def caffe_forward(x: torch.Tensor, w) -> torch.Tensor:
    """CaffeNet as Caffe computes it: grouped convolutions, pooling rounded up, inverted dropout."""
    for name, _, stride, pad, groups in CAFFE_CONVS:
        a, b = (torch.from_numpy(v) for v in w[name])
        x = F.relu(F.conv2d(x, a, b, stride=stride, padding=pad, groups=groups))
        if name in ("conv1", "conv2", "conv5"):
            x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        if name in ("conv1", "conv2"):
            x = F.local_response_norm(x, 5, 1e-4, 0.75, 1.0)
    x = x.flatten(1)
    for name in ("fc6", "fc7", "fc8"):
        a, b = (torch.from_numpy(v) for v in w[name])
        x = F.linear(x, a, b)
        x = F.relu(x) if name != "fc8" else x
    return x


@pytest.fixture(scope="module")
def caffe_full():
    return caffenet_weights()


def test_caffe_import_matches_grouped_caffenet(caffe_full, tmp_path):
    src = tmp_path / "bvlc_reference_caffenet.caffemodel"
    src.write_bytes(caffemodel(caffenet_layers(caffe_full), "v1"))  # the released file's form (inferred)
    mean_file = tmp_path / "imagenet_mean.binaryproto"  # a BGR mean image: B 100, G 110, R 120
    mean_file.write_bytes(encode_blobproto(np.stack([np.full((4, 4), v, np.float32) for v in (100, 110, 120)])))
    result = import_weights(src, ImportConfig(output=tmp_path / "w.pt", mean_file=mean_file))
    assert (result.arch, result.crop, result.num_classes) == ("neon", 227, CLASSES)
    assert "conv2 (2 groups), conv4 (2 groups), conv5 (2 groups)" in result.summary()
    body, model = load(tmp_path / "w.pt")
    assert body["data"]["channel_order"] == "BGR" and body["data"]["crop"] == 227
    assert body["data"]["mean_rgb"] == [120.0, 110.0, 100.0]
    # Caffe's ImageNet recipe squashed every image to 256x256: predict does too, and the summary says so
    assert body["data"]["squash"] == [256, 256] and InputSpec.from_data(body["data"], 227).squash == (256, 256)
    assert "crop 227 of every image squashed to 256x256" in result.summary().splitlines()[0]
    # the ungrouped conv2 computes what Caffe's grouped one did
    y = torch.randn(2, 96, 27, 27, generator=torch.Generator().manual_seed(2))
    a, b = (torch.from_numpy(v) for v in caffe_full["conv2"])
    with torch.no_grad():
        close(model.conv2(y), F.conv2d(y, a, b, padding=2, groups=2))
        x = torch.randn(1, 3, 227, 227, generator=torch.Generator().manual_seed(3)) * 40
        close(model(x), caffe_forward(x, caffe_full))


def test_caffe_new_layer_form_with_shape_dims_maps_the_same(caffe_full):
    imp = caffe.convert(*read_layers(caffemodel(caffenet_layers(caffe_full), "new")))
    assert [round(v, 1) for v in imp.mean_rgb] == [122.7, 116.7, 104.0] and imp.channel_order == "BGR"
    sd = imp.state_dict
    for name in ("conv1", "conv3", "fc6", "fc7", "fc8"):
        torch.testing.assert_close(sd[f"{name}.weight"], torch.from_numpy(caffe_full[name][0]))
        torch.testing.assert_close(sd[f"{name}.bias"], torch.from_numpy(caffe_full[name][1]))
    y = torch.randn(1, 384, 13, 13, generator=torch.Generator().manual_seed(5))
    for name in ("conv4", "conv5"):
        a, b = (torch.from_numpy(v) for v in caffe_full[name])
        close(F.conv2d(y, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1), F.conv2d(y, a, b, padding=1, groups=2))


def test_caffe_layers_read_in_both_forms():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    fc = rng.standard_normal((5, 7)).astype(np.float32)
    layers = [("conv1", "Convolution", [w, w[:, 0, 0, 0]]), ("relu1", "ReLU", []), ("fc6", "InnerProduct", [fc])]
    for form in ("v1", "new"):
        name, read = read_layers(caffemodel(layers, form))
        assert name == "CaffeNet" and [(x.name, x.type) for x in read] == [(n, k) for n, k, _ in layers]
        np.testing.assert_array_equal(read[0].blobs[0], w)
        assert read[0].blobs[1].reshape(-1).tolist() == w[:, 0, 0, 0].tolist()
        assert read[2].blobs[0].shape == ((1, 1, 5, 7) if form == "v1" else (5, 7))
        np.testing.assert_array_equal(read[2].blobs[0].reshape(5, 7), fc)


def test_truncated_caffemodel_says_so(tmp_path):
    rng = np.random.default_rng(0)
    data = caffemodel([("conv1", "Convolution", [rng.standard_normal((96, 3, 11, 11)).astype(np.float32)])], "v1")
    src = tmp_path / "net.caffemodel"
    src.write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(main, ["import-weights", str(src), "-o", str(tmp_path / "w.pt")])
    assert res.exit_code == 1 and "truncated or damaged" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_caffemodel_of_another_network_names_the_layer(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 3, 11, 11)).astype(np.float32)
    src = tmp_path / "net.caffemodel"
    src.write_bytes(caffemodel([("conv1", "Convolution", [w, np.zeros(64, np.float32)])], "new"))
    with pytest.raises(FormatError,
                       match=r"caffe conv1 weight has shape \(64, 3, 11, 11\), expected \(96, 3, 11, 11\)"):
        import_weights(src, ImportConfig(output=tmp_path / "w.pt", fmt="caffe"))


# ---------------------------------------------------------------- torchvision

def tv_forward(x: torch.Tensor, sd) -> torch.Tensor:
    """torchvision.models.alexnet's forward, in plain torch ops on its own keys (eval mode)."""
    def conv(x, i, stride=1, pad=1):
        return F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], stride, pad))

    x = F.max_pool2d(conv(x, 0, 4, 2), 3, 2)
    x = F.max_pool2d(conv(x, 3, 1, 2), 3, 2)
    x = F.max_pool2d(conv(conv(conv(x, 6), 8), 10), 3, 2)
    x = F.adaptive_avg_pool2d(x, (6, 6)).flatten(1)
    x = F.relu(F.linear(x, sd["classifier.1.weight"], sd["classifier.1.bias"]))
    x = F.relu(F.linear(x, sd["classifier.4.weight"], sd["classifier.4.bias"]))
    return F.linear(x, sd["classifier.6.weight"], sd["classifier.6.bias"])


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    sd = tv_state_dict()
    path = tmp_path_factory.mktemp("tv") / "alexnet-owt.pth"
    torch.save(sd, path)
    return path, sd


def test_torchvision_import_matches_its_forward(tv_file, tmp_path):
    src, sd = tv_file
    result = import_weights(src, ImportConfig(output=tmp_path / "w.pt"))
    assert (result.arch, result.crop, result.num_classes) == ("torchvision", 224, CLASSES)
    body, model = load(tmp_path / "w.pt")
    assert body["model_config"]["arch"] == "torchvision"
    data = body["data"]
    assert (data["channel_order"], data["value_range"], data["crop"]) == ("RGB", [0.0, 1.0], 224)
    assert data["mean_rgb"] == [0.485, 0.456, 0.406] and data["std_rgb"] == [0.229, 0.224, 0.225]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        close(model(x), tv_forward(x, sd))


def test_cli_synsets_permute_fc8_and_mean_std_override(tv_file, tmp_path):
    src, sd = tv_file
    ids = [f"n{(7 * i) % CLASSES:08d}" for i in range(CLASSES)]  # the source's (unsorted) class order
    synsets = tmp_path / "synset_words.txt"
    synsets.write_text("".join(f"{wnid} name of {wnid}\n" for wnid in ids))
    out = tmp_path / "w.pt"
    res = CliRunner().invoke(main, ["import-weights", str(src), "-o", str(out), "--synsets", str(synsets),
                                    "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"])
    assert res.exit_code == 0, res.output
    assert "permuted" in res.output and "sorted-id order" in res.output
    body = checkpoint.load(out)
    assert body["data"]["classes"] == sorted(ids)
    assert body["data"]["class_names"] == [f"name of {wnid}" for wnid in sorted(ids)]
    assert body["data"]["mean_rgb"] == [0.5] * 3 and body["data"]["std_rgb"] == [0.25] * 3
    for row, wnid in enumerate(sorted(ids)):  # row j of the file is the source's row for class j's wnid
        torch.testing.assert_close(body["model"]["fc8.weight"][row], sd["classifier.6.weight"][ids.index(wnid)])
        torch.testing.assert_close(body["model"]["fc8.bias"][row], sd["classifier.6.bias"][ids.index(wnid)])


def test_output_and_mean_file_misuse_is_one_line(tv_file, tmp_path):
    src, _ = tv_file
    res = CliRunner().invoke(main, ["import-weights", str(src), "-o", str(tmp_path)])
    assert res.exit_code == 1 and "is a directory" in res.output and "Traceback" not in res.output
    mean_file = tmp_path / "mean.binaryproto"
    mean_file.write_bytes(encode_blobproto(np.zeros((3, 2, 2), np.float32)))
    with pytest.raises(ValueError, match="0..1 input"):
        import_weights(src, ImportConfig(output=tmp_path / "w.pt", mean_file=mean_file))


def test_pth_of_another_network_names_the_first_mismatch(tmp_path):
    sd = {k: torch.zeros(1) for k in ("features.0.weight", "features.0.bias")}
    for key, shape in TV_SHAPES.items():
        sd[f"{key}.weight"], sd[f"{key}.bias"] = torch.zeros(shape), torch.zeros(shape[0])
    sd["features.3.weight"] = torch.zeros(256, 64, 5, 5)
    src = tmp_path / "other.pth"
    torch.save(sd, src)
    res = CliRunner().invoke(main, ["import-weights", str(src), "-o", str(tmp_path / "w.pt")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "features.3.weight (conv2) has shape (256, 64, 5, 5), expected (192, 64, 5, 5)" in res.output


def test_format_is_told_by_content_not_suffix(tmp_path):
    assert detect_format(py2_pickle({"a": 1})[:16]) == "neon"
    assert detect_format(caffemodel([("conv1", "Convolution", [])], "v1")[:16]) == "caffe"
    assert detect_format(caffemodel([], "new")[:16]) == "caffe"
    path = tmp_path / "x.caffemodel"
    torch.save({"a": torch.zeros(1)}, path)
    assert detect_format(path.read_bytes()[:16]) == "torchvision"
    path.write_bytes(b"GIF89a" + b"\0" * 20)
    assert detect_format(path.read_bytes()[:16]) is None
    with pytest.raises(FormatError, match="not a neon pickle, a caffemodel or a torch"):
        import_weights(path, ImportConfig(output=tmp_path / "w.pt"))


@pytest.mark.parametrize("kind", ["weights", "checkpoint", "older-file"])
def test_own_file_is_named_as_ours(tv_file, tmp_path, kind):
    """Issue 21.12: a file alexnet-pipe wrote got "not a state_dict"; it needs no import."""
    src, _ = tv_file
    ours = tmp_path / "w.pt"
    import_weights(src, ImportConfig(output=ours))
    body = {k: v for k, v in checkpoint.load(ours).items() if k not in ("format", "version", "created_by")}
    if kind == "checkpoint":
        ours = tmp_path / "alexnet.ckpt"
        checkpoint.save(ours, dict(body, kind="checkpoint", epoch=1, history=[],
                                   optimizer={"state": {}, "param_groups": []}))
    elif kind == "older-file":  # written before the SHA-256 trailer existed
        ours = tmp_path / "old.pt"
        torch.save(dict(body, format=checkpoint.FORMAT, version=checkpoint.VERSION), ours)
    expected = "checkpoint" if kind == "checkpoint" else "weights"

    for extra in ([], ["--format", "torchvision"]):
        res = CliRunner().invoke(main, ["import-weights", str(ours), "-o", str(tmp_path / "again.pt"), *extra])
        lines = res.stderr.splitlines()
        assert res.exit_code == 1 and len(lines) == 1, res.output
        assert f"{ours} is already an alexnet-pipe {expected} file" in lines[0], lines
        assert f"--model-file {ours}" in lines[0] and "state_dict" not in lines[0], lines
        assert not (tmp_path / "again.pt").exists()
