import dataclasses
import json
import typing

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
    with pytest.raises(ConfigError, match=r"train.eval_auc_bins is -1; it must lie in \[0, inf\) \(0 computes the exact"):
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


@pytest.mark.parametrize("override,message", [
    (["--train.eval_every", "-5"], r"train.eval_every is -5; it must lie in \[0, inf\)"),
    (["--train.checkpoint_every", "-5"], r"train.checkpoint_every is -5; it must lie in \[0, inf\)"),
    (["--train.log_every", "0"], r"train.log_every is 0; it must lie in \[1, inf\)"),
    (["--train.max_steps", "-1"], r"train.max_steps is -1; it must lie in \[0, inf\) \(0 runs all epochs\)"),
    (["--train.epochs", "0"], r"train.epochs is 0; it must lie in \[1, inf\)"),
    (["--model.dropout", "2"], r"model.dropout is 2.0; it must lie in \[0, 1\)"),
    (["--model.dropout", "1"], r"model.dropout is 1.0; it must lie in \[0, 1\)"),
    (["--optim.sparse_lr", "0"], r"optim.sparse_lr is 0.0; it must lie in \(0, inf\)"),
    (["--data.num_workers", "-1"], r"data.num_workers is -1"),
    (["--tasks.ctr.weight", "-1"], r"tasks.ctr.weight is -1.0"),
    (["--model.tower_layers", "[8, 0]"], r"model.tower_layers is \[8, 0\]; layer sizes must be at least 1"),
    (["--train.early_stop", "ctr/rmse", "--train.eval_every", "5"], r"train.early_stop is 'ctr/rmse'"),
    (["--train.early_stop", "ctr/auc"], r"train.early_stop needs train.eval_every"),
])
def test_numeric_fields_out_of_range_are_one_line_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, BASE), override)


def test_edges_of_the_ranges_load(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["--train.eval_every", "0", "--train.max_steps", "0",
                                              "--model.dropout", "0.99", "--train.keep_checkpoints", "0",
                                              "--train.early_stop", "ctr/logloss", "--train.eval_every", "5"])
    assert cfg.model.dropout == 0.99 and cfg.train.early_stop == "ctr/logloss"


def test_a_malformed_file_is_one_line_with_its_line_number(tmp_path):
    with pytest.raises(ConfigError, match=r"c.toml: not valid TOML: Invalid value \(at line 4, column 10\)"):
        load_config(write(tmp_path, BASE + "[train]\nepochs = \n"))


def _leaf_keys(cls, prefix=""):
    """Every config field as a dotted key, found independently of the help's own walk."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_keys(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is dict:
            name = "<task>" if f.name == "tasks" else "<column>"
            yield from _leaf_keys(typing.get_args(tp)[1], f"{prefix}{f.name}.{name}.")
        else:
            yield f"{prefix}{f.name}", f


@pytest.mark.parametrize("command", ["train", "predict", "eval", "plan", "export"])
def test_help_lists_every_config_key_with_type_default_and_meaning(command, capsys):
    from app.cli import main
    from app.config import Config

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for key, f in _leaf_keys(Config):
        at = text.find(f"\n  {key}: ")
        assert at >= 0, f"{key} is missing from `mmoe {command} --help`"
        entry, meaning = text[at + 1:].split("\n")[:2]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert entry.endswith(f" = {json.dumps(default)}"), entry
        assert meaning.startswith("      ") and meaning.strip(), f"{key} has no meaning in the help"
