import json

import pytest

from model.config import CHUNKED, FULL, Llama4Config, config_from_hf, load_config, preset
from tests.oracle import MAVERICK_LIKE, SCOUT_LIKE, hf_text_config


def test_no_rope_layers_one_means_rope_and_chunked():
    c = Llama4Config(num_hidden_layers=8, no_rope_layer_interval=4)
    assert c.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0]
    assert c.layer_types == [CHUNKED] * 3 + [FULL] + [CHUNKED] * 3 + [FULL]
    assert c.uses_rope(0) and not c.uses_rope(3)


def test_empty_no_rope_layers_is_derived_like_none():
    assert Llama4Config(num_hidden_layers=4, no_rope_layers=[]).no_rope_layers == [1, 1, 1, 0]


def test_moe_layers_from_interleave_step():
    assert Llama4Config(num_hidden_layers=6, interleave_moe_layer_step=2).moe_layers == [1, 3, 5]
    assert Llama4Config(num_hidden_layers=3, interleave_moe_layer_step=1).moe_layers == [0, 1, 2]
    assert Llama4Config(num_hidden_layers=3, moe_layers=[]).moe_layers == []
    with pytest.raises(ValueError, match="interleave_moe_layer_step"):
        Llama4Config(num_hidden_layers=3, interleave_moe_layer_step=0)


def test_explicit_layer_types_override_rope_pattern():
    c = Llama4Config(num_hidden_layers=2, layer_types=[FULL, FULL])
    assert c.no_rope_layers == [1, 1] and c.layer_types == [FULL, FULL]


def test_no_chunk_size_means_full_attention():
    c = Llama4Config(num_hidden_layers=4, attention_chunk_size=None)
    assert c.layer_types == [FULL] * 4


def test_presets_have_real_sizes():
    scout, maverick = preset("scout"), preset("maverick")
    assert (scout.num_local_experts, scout.moe_layers) == (16, list(range(48)))
    assert (maverick.num_local_experts, maverick.moe_layers) == (128, list(range(1, 48, 2)))
    assert maverick.use_qk_norm is False and maverick.rope_scaling.rope_type == "default"
    assert scout.rope_scaling.factor == 16.0
    assert (maverick.hidden_size, maverick.head_dim, maverick.num_key_value_heads) == (5120, 128, 8)
    assert maverick.layer_types.count(FULL) == 12
    assert preset("debug").num_hidden_layers == 4
    with pytest.raises(KeyError):
        preset("nope")


@pytest.mark.parametrize("base", [SCOUT_LIKE, MAVERICK_LIKE])
def test_derived_fields_equal_transformers(base):
    hf = hf_text_config(base)
    ours = config_from_hf(hf.to_dict())
    assert ours.no_rope_layers == hf.no_rope_layers
    assert ours.moe_layers == hf.moe_layers
    assert ours.layer_types == hf.layer_types
    assert ours.head_dim == hf.head_dim


def test_v5_rope_parameters_and_legacy_rope_scaling_agree():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    legacy = config_from_hf({"num_hidden_layers": 2, "rope_theta": 1e4, "rope_scaling": scaling})
    v5 = config_from_hf({"num_hidden_layers": 2, "rope_parameters": {"rope_theta": 1e4, **scaling}})
    assert legacy.rope_scaling == v5.rope_scaling and legacy.rope_theta == v5.rope_theta == 1e4
    plain = config_from_hf({"num_hidden_layers": 2, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert plain.rope_scaling.rope_type == "default"
    with pytest.raises(ValueError, match="yarn"):
        config_from_hf({"num_hidden_layers": 2, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_nested_conditional_config(tmp_path):
    raw = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
           "text_config": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "head_dim": None, "eos_token_id": [5, 6]},
           "vision_config": {"hidden_size": 32}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = load_config(tmp_path)
    assert c.head_dim == 16 and c.eos_token_id == [5, 6] and c.num_hidden_layers == 2


def test_missing_config_and_bad_values():
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config("/nonexistent")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Llama4Config(num_hidden_layers=1, num_attention_heads=5, num_key_value_heads=2)
    with pytest.raises(ValueError, match="moe_layers"):
        Llama4Config(num_hidden_layers=2, moe_layers=[3])
