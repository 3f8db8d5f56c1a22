"""The decoder's own structure: scan/unroll/remat agree, sharded forwards over 8 simulated devices equal
the single-device one, every parameter has a sharding rule, and bad checkpoints or configs fail clearly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefopt_jax import models, sharding
from prefopt_jax.models.safetensors_io import write_safetensors

CFG = models.ModelConfig(
    family="gemma2",  # the family with the most moving parts
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    layer_windows=(3, 0, 3, 0),
    attn_logit_softcap=5.0,
    final_logit_softcap=10.0,
    sandwich_norms=True,
    norm_offset=1.0,
    embed_scale=True,
    activation="gelu_tanh",
    tie_embeddings=True,
)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 12)))


@pytest.fixture(scope="module")
def model():
    return models.create_model(CFG, seed=1)


def test_scanned_unrolled_and_remat_agree(model):
    want = np.asarray(model(IDS))
    params = model.params()
    for scan, remat in [(False, "none"), (True, "full"), (True, "dots"), (False, "dots_no_batch")]:
        hidden = models.forward_hidden(CFG, params, IDS, scan_layers=scan, remat=remat)
        got = np.asarray(models.logits_from_hidden(CFG, params, hidden))
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"scan={scan} remat={remat}")


def test_gradients_agree_with_and_without_remat(model):
    params = model.params()

    def loss(p, remat):
        return jnp.mean(models.forward_hidden(CFG, p, IDS, remat=remat) ** 2)

    g0 = jax.grad(loss)(params, "none")
    g1 = jax.grad(loss)(params, "full")
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("preset,mesh_shape", [("fsdp", (1, 8, 1)), ("fsdp_tp", (2, 2, 2)), ("dp", (8, 1, 1))])
def test_sharded_forward_equals_single_device(model, preset, mesh_shape):
    mesh = sharding.make_mesh(*mesh_shape)
    sharded = models.create_model(CFG, seed=1, mesh=mesh, rules=preset)
    q = sharded.layers.q.get_value()
    assert len(q.sharding.device_set) == 8
    assert isinstance(sharded.constrain, sharding.activation_constraint)  # activations placed by name too
    if preset == "fsdp_tp":
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        assert q.addressable_shards[0].data.shape == (4, 16, 2, 8)  # never the full array on one device
    ids = jax.device_put(IDS, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    got = jax.jit(lambda m, x: m(x))(sharded, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(model(IDS)), atol=1e-5)


def test_loading_lands_sharded(tmp_path, model):
    models.save_pretrained(model, tmp_path)
    mesh = sharding.make_mesh(1, 8, 1)
    loaded = models.load_pretrained(tmp_path, mesh=mesh, rules="fsdp")
    embed = loaded.embed.get_value()
    assert embed.addressable_shards[0].data.shape == (64, 4)
    np.testing.assert_allclose(np.asarray(loaded(IDS)), np.asarray(model(IDS)), atol=1e-5)


def test_every_parameter_needs_a_rule():
    mesh = sharding.make_mesh(1, 8, 1)
    rules = sharding.rules_for("fsdp")
    del rules["mlp"]
    with pytest.raises(
        sharding.ShardingError, match=r"parameter 'layers/gate'.*logical axis 'mlp' has no sharding rule"
    ):
        models.param_shardings(CFG, mesh, rules)


def test_indivisible_axis_names_the_dimension():
    mesh = sharding.make_mesh(1, 1, 8)
    with pytest.raises(sharding.ShardingError, match=r"parameter 'layers/q': dimension 2 of size 4 .*'tensor'"):
        models.param_shardings(CFG, mesh, "fsdp_tp")
    with pytest.raises(sharding.ShardingError, match="needs 12 devices, 8 are available"):
        sharding.make_mesh(3, 4, 1)
    with pytest.raises(sharding.ShardingError, match="unknown sharding preset 'zero3'"):
        sharding.rules_for("zero3")


def test_unsupported_architecture_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(models.ModelConfigError, match=r"'gpt2' is not supported; supported: llama, mistral"):
        models.load_pretrained(tmp_path)


def test_missing_and_corrupt_checkpoints(tmp_path, model):
    with pytest.raises(models.CheckpointError, match="no such file or folder"):
        models.load_pretrained(str(tmp_path / "nope.gguf"))
    models.save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(models.CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        models.load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(models.CheckpointError, match=r"no model\.safetensors"):
        models.load_pretrained(tmp_path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF garbage")
    with pytest.raises(models.CheckpointError, match=r"bad\.gguf: not a readable GGUF file"):
        models.load_pretrained(bad)


def test_unreachable_hub_id_says_what_it_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.CheckpointError, match=r"'nobody/no-such-model' is not a short name"):
        models.load_pretrained("nobody/no-such-model")


def test_truncated_file_and_missing_or_misshapen_tensor(tmp_path, model):
    models.save_pretrained(model, tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(models.CheckpointError, match="truncated"):
        models.load_pretrained(tmp_path)
    models.save_pretrained(model, tmp_path)
    from prefopt_jax.models.safetensors_io import read_safetensors

    tensors = {k: np.asarray(v) for k, v in read_safetensors(f).items()}
    q = tensors.pop("model.layers.2.self_attn.q_proj.weight")
    write_safetensors(f, tensors)
    with pytest.raises(models.CheckpointError, match=r"'model.layers.2.self_attn.q_proj.weight' is missing"):
        models.load_pretrained(tmp_path)
    tensors["model.layers.2.self_attn.q_proj.weight"] = q[:, :16]
    write_safetensors(f, tensors)
    with pytest.raises(models.CheckpointError, match=r"q_proj.weight' has shape \(32, 16\)"):
        models.load_pretrained(tmp_path)


def test_sharded_index_folder(tmp_path, model):
    """A checkpoint split over two files with an index loads the same."""
    models.save_pretrained(model, tmp_path / "one")
    from prefopt_jax.models.safetensors_io import read_safetensors

    tensors = {k: np.asarray(v) for k, v in read_safetensors(tmp_path / "one" / "model.safetensors").items()}
    names = sorted(tensors)
    half = len(names) // 2
    out = tmp_path / "two"
    out.mkdir()
    (out / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    write_safetensors(out / "a.safetensors", {k: tensors[k] for k in names[:half]})
    write_safetensors(out / "b.safetensors", {k: tensors[k] for k in names[half:]})
    index = {"weight_map": {k: ("a.safetensors" if i < half else "b.safetensors") for i, k in enumerate(names)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    np.testing.assert_allclose(np.asarray(models.load_pretrained(out)(IDS)), np.asarray(model(IDS)), atol=1e-6)


def test_num_params_counts_the_table():
    total = sum(int(np.prod(shape)) for shape, _, _ in models.param_table(CFG).values())
    assert CFG.num_params() == total
