import pytest

from app.config import ConfigError, load_config, parse_overrides


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


BASE = '[tasks.ctr]\ntype = "binary"\n'


def test_defaults_file_and_command_line_precedence(tmp_path):
    path = write(tmp_path, BASE + "[train]\nepochs = 4\nlog_every = 7\n")
    cfg = load_config(path, ["--train.epochs", "9", "--model.expert_layers=[8, 4]"])
    assert cfg.name == "c"
    assert cfg.train.epochs == 9  # command line beats file
    assert cfg.train.log_every == 7  # file beats default
    assert cfg.train.seed == 0  # default
    assert cfg.model.expert_layers == [8, 4]
    assert cfg.tasks["ctr"].label == "ctr"  # label defaults to the task name


def test_unknown_keys_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown key train.epoch;"):
        load_config(write(tmp_path, BASE + "[train]\nepoch = 1\n"))
    with pytest.raises(ConfigError, match="unknown key colour; known keys: data, model"):
        load_config(write(tmp_path, "colour = 1\n" + BASE))
    with pytest.raises(ConfigError, match="unknown key tasks.ctr.wieght"):
        load_config(write(tmp_path, BASE), ["--tasks.ctr.wieght", "2"])


def test_wrong_types_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs: expected int, got 'many'"):
        load_config(write(tmp_path, BASE), ["--train.epochs", "many"])
    with pytest.raises(ConfigError, match=r"data.shuffle: expected bool"):
        load_config(write(tmp_path, BASE + "[data]\nshuffle = 1\n"))
    with pytest.raises(ConfigError, match=r"tasks.ctr.type is 'ranking'"):
        load_config(write(tmp_path, '[tasks.ctr]\ntype = "ranking"\n'))
    with pytest.raises(ConfigError, match=r"train.eval_auc_bins is -1; use 0 \(exact AUC\)"):
        load_config(write(tmp_path, BASE), ["--train.eval_auc_bins", "-1"])
    assert load_config(write(tmp_path, BASE), ["--optim.dense_lr", "1"]).optim.dense_lr == 1.0


def test_no_tasks_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="defines no tasks"):
        load_config(write(tmp_path, "[train]\nepochs = 1\n"))
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--train.epochs"])
    with pytest.raises(ConfigError, match="unexpected argument 'epochs'"):
        parse_overrides(["epochs", "2"])


def test_shipped_configs_load():
    for name in ("census_mmoe", "debug", "criteo_mmoe"):
        cfg = load_config(f"configs/{name}.toml")
        assert len(cfg.tasks) == 2
