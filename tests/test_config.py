import pytest

from hdm._config import HDMConfig, apply_assignments, read_config_file, set_value, to_toml


def test_a_written_configuration_reads_back_to_the_same_values(tmp_path):
    config = apply_assignments(HDMConfig(), ["dagm.opacity=0.3,0.9", "pom.filtering=no", "space.backbone=lite1",
                                             "train.steps=12", "ddm.top_k=0"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert read_config_file(path) == config
    assert (config.dagm.opacity, config.pom.filtering, config.train.steps, config.ddm.top_k) == ((0.3, 0.9), False, 12, 0.0)


@pytest.mark.parametrize("key, value, message", [
    ("ddm.nothing", 1, "unknown setting 'ddm.nothing'"),
    ("nowhere.top_k", 1, "unknown setting 'nowhere.top_k'"),
    ("train.steps", 2.5, "train.steps must be an integer, not 2.5"),
    ("train.steps", True, "train.steps must be an integer"),
    ("pom.filtering", "perhaps", "pom.filtering must be true or false"),
    ("ddm.top_k", "lots", "ddm.top_k must be a number"),
    ("dagm.opacity", [0.5], "dagm.opacity must be 2 comma-separated numbers"),
])
def test_each_bad_setting_is_one_line_naming_where_it_came_from(key, value, message):
    with pytest.raises(ValueError) as info:
        set_value(HDMConfig(), key, value, "my.toml")
    assert str(info.value).startswith("my.toml: ") and message in str(info.value) and "\n" not in str(info.value)


def test_toml_settings_must_sit_in_section_tables(tmp_path):
    path = tmp_path / "flat.toml"
    path.write_text("top_k = 0.1\n")
    with pytest.raises(ValueError, match="'top_k' must be a table of settings"):
        read_config_file(path)
    path.write_text("[ddm\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        read_config_file(path)
