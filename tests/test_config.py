"""jdiff.config: declared fields, one dotted key per field, JSON round trip, resume rules."""

import json

import pytest

from jdiff.config import (
    KEYS,
    PRESETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    fixed_conflicts,
    from_dict,
    get_preset,
    resolve,
    suggest,
    to_dict,
)


def test_every_field_is_declared_with_help_and_a_valid_default():
    for key in KEYS.values():
        assert key.spec.help, key.path
        if key.spec.kind is not dict:
            key.spec.check(key.path, key.spec.default)
    TrainConfig()  # the defaults form a valid config


def test_keys_resolve_dotted_and_registry_entries_only():
    assert resolve("optim.lr") == "optim.lr" and resolve("sampling.steps") == "sampling.steps"
    assert resolve("model.ch") == "model.fields.ch" and resolve("sampling.eta") == "sampling.options.eta"
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean optim.lr\?\)"):
        resolve("optim.lrr")
    for bare, dotted in [("lr", "optim.lr"), ("steps", "optim.steps"), ("workdir", "run.workdir")]:
        with pytest.raises(ConfigError, match=rf"unknown config key '{bare}' \(did you mean {dotted}\?\)"):
            resolve(bare)
        assert suggest(bare) == dotted
    for gone in ("sample_steps", "model_overrides", "model"):  # no second spelling of any key
        with pytest.raises(ConfigError, match="unknown config key"):
            resolve(gone)


def test_overrides_parse_text_with_each_fields_type():
    c = apply_overrides(
        get_preset("digits"),
        [
            ("optim.lr", "1e-4"),
            ("data.random_flip", "yes"),
            ("data.image_size", "none"),
            ("optim.steps", "2e3"),
            ("model.ch_mult", "(1, 2)"),
            ("model.dropout", "0"),
            ("sampling.eta", "0.5"),
            ("sampling.guidance_scale", "2"),
        ],
    )
    assert c.optim.lr == 1e-4 and c.data.random_flip is True and c.data.image_size is None
    assert c.optim.steps == 2000 and isinstance(c.optim.steps, int)
    assert c.model.fields == {"ch_mult": (1, 2), "dropout": 0} and c.sampling.options == {"eta": 0.5}
    assert c.sampling.guidance_scale == 2.0


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("optim.steps", "2.5", "bad value '2.5' for optim.steps: expected int"),
        ("optim.adam_b2", "1", "optim.adam_b2 must be in [0, 1), got 1.0"),
        ("optim.lr", "nan", "optim.lr must be finite"),
        ("data.channels", "2", "bad value 2 for data.channels; allowed: 1, 3"),
        ("diffusion.schedule", "cosin", "allowed: linear, scaled_linear, cosine, sigmoid"),
        ("model.ch", "8.5", "bad value 8.5 for model.ch: expected int like 32"),
        ("model.attention_resolutions", "4", "expected tuple like (4,)"),
        ("model.chh", "8", "unknown model field(s) ['chh'] for 'unet_small'"),
        ("sampling.variance", "beta", "sampler 'ddim' has no option 'variance' (its options: eta)"),
        ("sampling.eta", "-1", "sampling.eta must be in [0, 1]"),
        ("run.workdir", "", "run.workdir must not be empty"),
        ("model.fields", "[1]", "expected a JSON object"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(key, value, words):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("digits"), [(key, value)])
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cross_section_rules():
    with pytest.raises(ConfigError, match=r"sampling.steps \(200\) must be <= diffusion.num_timesteps \(100\)"):
        apply_overrides(get_preset("digits"), {"diffusion.num_timesteps": 100, "sampling.steps": 200})
    with pytest.raises(ConfigError, match="zero_terminal_snr needs prediction v or x0"):
        apply_overrides(get_preset("digits"), {"diffusion.zero_terminal_snr": True})
    ok = apply_overrides(get_preset("digits"), {"diffusion.prediction": "v", "diffusion.zero_terminal_snr": True})
    assert ok.diffusion.zero_terminal_snr


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    c = get_preset(name)
    assert from_dict(json.loads(json.dumps(to_dict(c)))) == c


def test_only_the_sectioned_config_loads():
    c = from_dict({"model": {"name": "unet_small", "fields": {"ch": 8, "ch_mult": [1]}}, "optim": {"batch_size": 8}})
    assert c.model.fields == {"ch": 8, "ch_mult": (1,)} and c.optim.batch_size == 8
    with pytest.raises(ConfigError, match=r"not a jdiff 0.1 config: unknown section\(s\) \['dataset', 'steps'\]"):
        from_dict({"dataset": "digits", "steps": 4})
    with pytest.raises(ConfigError, match="unknown config key 'optim.no_such_field'"):
        from_dict({"optim": {"no_such_field": 1}})


def test_fixed_fields_are_the_ones_that_change_the_model_or_data():
    base = get_preset("digits")
    changed = apply_overrides(base, {"optim.lr": 1e-4, "run.log_every": 5, "sampling.steps": 10})
    assert fixed_conflicts(base, changed) == []
    changed = apply_overrides(base, {"model.ch": 16, "diffusion.prediction": "v"})
    assert fixed_conflicts(base, changed) == ["model.fields: {} -> {'ch': 16}", "diffusion.prediction: 'eps' -> 'v'"]


def test_overrides_apply_in_order_and_configs_are_immutable():
    c = apply_overrides(get_preset("digits"), [("optim.lr", "1e-3"), ("optim.lr", "2e-3")])
    assert c.optim.lr == 2e-3
    with pytest.raises(AttributeError):
        c.optim.lr = 1.0
