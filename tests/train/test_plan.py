"""`prefopt-jax plan`: the train step compiled ahead of time from shapes alone. The compiled executable's
argument bytes per device equal a hand count of the parameters, optimizer state and reference copy."""

import json
from pathlib import Path

import pytest

from prefopt_jax.config import load_config
from prefopt_jax.train import plan

SMALL = dict(V=512, D=64, F=128, L=2, H=4, K=2, E=16)
WIDE = dict(V=1024, D=256, F=512, L=2, H=2, K=2, E=128)  # TPU tiles (8 x 128) pad little at these widths


def source(tmp_path, V, D, F, L, H, K, E):
    """A reduced Llama: config.json only, no weights are read."""
    config = {
        "model_type": "llama", "vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": K, "head_dim": E, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.fixture
def tiny_source(tmp_path):
    return source(tmp_path, **SMALL)


def expected_bytes(fsdp: int, V, D, F, L, H, K, E, lora_rank: int = 0) -> tuple[int, int]:
    """(train state, reference copy) bytes per device, counted by hand: every matrix is split over fsdp
    along its hidden dimension; the norms are replicated; Adam keeps two moments; counters are int32."""
    matrices = 2 * V * D + L * (D * H * E + 2 * D * K * E + H * E * D + 3 * D * F)
    norms = 2 * L * D + D
    params_f32 = 4 * (matrices // fsdp + norms)
    scalars = 4 * 4  # Adam's count, the schedule's count, step, skipped
    if lora_rank:  # adapters (replicated) train; the base is frozen and is the reference
        # A: q, k, v, gate, up read D; o reads H*E; down reads F. B: q writes H*E; k, v K*E; o, down D; gate, up F
        adapters = L * lora_rank * ((5 * D + H * E + F) + (H * E + 2 * K * E + 2 * D + 2 * F))
        return 3 * 4 * adapters + scalars, params_f32
    return 3 * params_f32 + scalars, 2 * (matrices // fsdp + norms)  # bfloat16 reference copy


def batch_bytes(r: dict, micro: int, devices: int) -> int:
    """A step's batch per device, counted by hand: each token of a row is 9 bytes (int32 id, int16 position
    and segment, int8 branch) and rows are split over the devices; each completion slot 8 bytes (int32 start
    and length) and each group slot 4 (float32 weight), on every device."""
    g = r["geometry"]
    assert g["length"] < 2**15
    return micro * (g["rows"] // devices * g["length"] * 9 + g["groups"] * (g["completions"] * 8 + 4))


def test_plan_argument_bytes_match_the_hand_count(tiny_source, capsys):
    cfg = load_config(
        overrides=[f"model.source={tiny_source}", "train.lora_rank=0", "train.reference=frozen",
                   "train.reference_dtype=bfloat16", "data.max_length=128", "train.batch_size=16",
                   "data.min_pack_length=0"],  # rows as long as one pair, not a step's share
    )  # fmt: skip
    r = plan.plan(cfg, "cpu:8")
    state, reference = expected_bytes(fsdp=8, **SMALL)
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert r["state_bytes"] == state and r["reference_bytes"] == reference
    # the worst case: 16 pairs of a 64-token prompt and two 64-token completions, one per 192-token row, so
    # two micro-batches of a row per device
    assert r["geometry"]["rows"] == 8 and r["geometry"]["length"] == 192 and r["shapes"] == 1
    assert r["batch_shape"][0] == 2 and r["geometry"]["groups"] == 8
    assert r["batch_bytes"] == batch_bytes(r, micro=2, devices=8)
    assert r["argument_bytes"] == state + reference + batch_bytes(r, micro=2, devices=8)
    assert r["temp_bytes"] > 0 and r["fits"] is None  # cpu:N has no memory limit
    printed = capsys.readouterr().out
    assert "simulated CPU devices (estimate)" in printed and "temporaries" in printed


def test_plan_lora_holds_the_base_once(tiny_source):
    cfg = load_config(overrides=[f"model.source={tiny_source}", "data.max_length=128", "train.batch_size=8"])
    r = plan.plan(cfg, "cpu:8")
    state, base = expected_bytes(fsdp=8, **SMALL, lora_rank=8)
    assert r["state_bytes"] == state and r["frozen_bytes"] == base and r["reference_bytes"] == 0
    assert r["argument_bytes"] == state + base + batch_bytes(r, micro=1, devices=8)


@pytest.mark.skipif(not plan.has_libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_plan_compiles_for_a_tpu_slice_with_the_tpu_compiler(tmp_path):
    """The TPU's own memory analysis: its layouts pad arrays to (8, 128) tiles, so the compiled argument
    bytes may exceed the hand count slightly (the batch's small index arrays), never fall short."""
    cfg = load_config(
        overrides=[f"model.source={source(tmp_path, **WIDE)}", "train.lora_rank=0", "train.reference=frozen",
                   "train.reference_dtype=bfloat16", "data.max_length=128", "train.batch_size=16"],
        devices=16,
    )  # fmt: skip
    r = plan.plan(cfg, "v5e-16")
    state, reference = expected_bytes(fsdp=16, **WIDE)
    assert r["compiled_for"] == "TPU (libtpu)" and r["devices"] == 16
    assert r["state_bytes"] == state and r["reference_bytes"] == reference
    counted = state + reference + batch_bytes(r, micro=1, devices=16)
    assert counted <= r["argument_bytes"] <= 1.05 * counted
    assert r["attention"] == "pallas"  # the TPU kernel, compiled by libtpu inside the step
    assert r["fits"] is True and r["device_memory"] == 16 * 2**30


def test_unknown_target_and_wrong_device_count():
    with pytest.raises(ValueError, match="unknown plan target 'v9x-8'"):
        plan.target("v9x-8")
    with pytest.raises(RuntimeError, match="simulating 16 devices needs a process started with that many"):
        plan.target_devices(plan.Target("cpu", 16, 1, None, None))


RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_validate_for_their_slice_and_for_8xh100(recipe):
    slice_name = recipe.read_text().split()[2].rstrip(":")  # "# TPU v5p-8: launch/tpu.sh ..."
    for devices in (plan.target(slice_name).devices, 8):
        cfg = load_config(recipe, devices=devices)
        assert cfg.train.batch_size == 128 and cfg.model.compute_dtype == "bfloat16"
    assert plan.target(slice_name).platform == "tpu"


@pytest.mark.skipif(not plan.has_libtpu(), reason="libtpu not installed (pip install -e '.[tpu]')")
def test_llama3_dpo_recipe_fits_its_slice():
    """The whole 8B step (full fine-tuning, bfloat16 reference copy, 16 pairs of 2048-token rows per
    micro-batch at most) compiled by the TPU compiler for a v5p-8, from shapes alone."""
    recipe = next(p for p in RECIPES if p.stem == "llama3-8b-instruct-dpo")
    r = plan.plan(load_config(recipe, devices=4), "v5p-8")
    assert r["params"] == 8_030_261_248 and r["compiled_for"] == "TPU (libtpu)"
    assert r["fits"] is True and r["total_bytes"] <= r["device_memory"]
