"""TrainConfig: unknown keys and wrong types are clear errors, --set overrides (nested, YAML-typed), JSON and YAML
files, and the resolved config saved next to the checkpoints."""

from __future__ import annotations

import json

import pytest
import yaml

from flare.cli import main
from flare.train.config import TrainConfig, load_config, to_dict
from flare.train.loop import Trainer


def _yaml(tmp_path, raw, name="train.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


BASE = {"model": "m", "data": {"train": [{"path": "d.jsonl"}], "seq_len": 96}, "steps": 10}


def test_yaml_and_json_files_give_the_same_config(tmp_path):
    from_yaml = load_config(_yaml(tmp_path, BASE))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(BASE))
    from_json = load_config(path)
    assert from_yaml == from_json
    assert from_yaml.steps == 10 and from_yaml.data.seq_len == 96
    assert from_yaml.data.train[0].path == "d.jsonl" and from_yaml.data.train[0].weight == 1.0
    # Untouched keys keep the defaults.
    assert from_yaml.optim == TrainConfig().optim and from_yaml.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize("raw, key", [
    ({**BASE, "stepz": 3}, "'stepz'"),
    ({**BASE, "optim": {"lrr": 0.1}}, "'optim.lrr'"),
    ({**BASE, "objective": {"block": 4}}, "'objective.block'"),
    ({**BASE, "data": {"train": [{"path": "a", "wieght": 2}]}}, "'data.train[0].wieght'"),
])
def test_unknown_key_is_named(tmp_path, raw, key):
    with pytest.raises(ValueError, match="unknown config key") as err:
        load_config(_yaml(tmp_path, raw))
    assert key in str(err.value)


@pytest.mark.parametrize("raw, key", [
    ({**BASE, "steps": "ten"}, "steps must be int"),
    ({**BASE, "steps": 2.5}, "steps must be int"),
    ({**BASE, "bf16": "yes"}, "bf16 must be bool"),
    ({**BASE, "optim": {"lr": "fast"}}, "optim.lr must be float"),
    ({**BASE, "optim": 3}, "optim must be a mapping"),
    ({**BASE, "data": {"train": "d.jsonl"}}, "data.train must be a list"),
    ({**BASE, "data": {"train": [{"weight": 2.0}]}}, "missing config key 'data.train[0].path'"),
])
def test_wrong_type_is_named(tmp_path, raw, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(_yaml(tmp_path, raw))


def test_set_overrides_nested_and_yaml_typed(tmp_path):
    path = _yaml(tmp_path, {**BASE, "optim": {"lr": 0.5, "warmup_steps": 7}})
    cfg = load_config(path, ["steps=3", "optim.lr=1e-4", "optim.schedule=cosine", "bf16=true",
                             "objective.kind=ar", "data.eval=null", "out_dir=runs/x=y",
                             "data.train=[{path: a.jsonl, weight: 2}, {path: b.jsonl, name: b2}]"])
    assert cfg.steps == 3 and isinstance(cfg.steps, int)
    # `1e-4` is a string to YAML 1.1; a float field takes it as the number.
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.warmup_steps == 7  # a sibling of an overridden key is kept
    assert cfg.optim.schedule == "cosine" and cfg.bf16 is True and cfg.objective.kind == "ar"
    assert cfg.data.eval is None and cfg.out_dir == "runs/x=y"
    assert [(s.path, s.weight, s.name) for s in cfg.data.train] == [("a.jsonl", 2.0, ""), ("b.jsonl", 1.0, "b2")]
    # Overrides without a file, and creating a section the file does not have.
    cfg = load_config(None, ["model=m", "data.seq_len=12", "objective.block_size=4"])
    assert (cfg.model, cfg.data.seq_len, cfg.objective.block_size) == ("m", 12, 4)


@pytest.mark.parametrize("override, message", [
    ("steps", "key=value"),
    ("optim.lrr=1", "'optim.lrr'"),
    ("steps=ten", "steps must be int"),
    ("model.path=x", "not a section"),
])
def test_bad_overrides(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        load_config(_yaml(tmp_path, BASE), [override])


def test_missing_and_malformed_config_files(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{steps: 1}")
    with pytest.raises(ValueError, match="bad.json"):
        load_config(bad_json)
    top = _yaml(tmp_path, [1, 2], "list.yaml")
    with pytest.raises(ValueError, match="mapping"):
        load_config(top)
    # The CLI turns each into a one-line error and exit status 2.
    for path in (tmp_path / "nope.yaml", bad):
        assert main(["train", "--config", str(path)]) == 2
        assert "flare train: error: " in capsys.readouterr().err


@pytest.mark.parametrize("sets, message", [
    (["data.seq_len=100"], r"data.seq_len \(100\) must be a multiple of objective.block_size \(3\)"),
    (["data.seq_len=96", "objective.block_size=5"], r"multiple of objective.block_size \(5\)"),
    (["steps=0"], "steps must be >= 1"),
    (["data.on_error=ignore"], "on_error"),
    (["optim.schedule=linear"], "schedule"),
    (["objective.kind=mdlm"], "objective kind"),
])
def test_invalid_values(tmp_path, sets, message):
    with pytest.raises(ValueError, match=message):
        load_config(_yaml(tmp_path, BASE), sets)


def test_resolved_config_is_saved_in_out_dir(make_config, tmp_path):
    raw = make_config()
    path = _yaml(tmp_path, raw)
    cfg = load_config(path, ["optim.lr=0.002", "objective.ar_loss_weight=0.5"])
    Trainer(cfg)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved == json.loads(json.dumps(to_dict(cfg)))
    assert saved["optim"]["lr"] == 0.002 and saved["objective"]["ar_loss_weight"] == 0.5
    # Defaults are written out in full, so the file alone reproduces the run.
    assert saved["optim"]["beta2"] == TrainConfig().optim.beta2 and saved["objective"]["block_size"] == 3
    # ... and it loads back as the same config.
    assert load_config(tmp_path / "out" / "config.json") == cfg


def test_defaults_are_a_valid_config():
    cfg = TrainConfig()
    assert cfg.data.seq_len % cfg.objective.block_size == 0
    assert load_config(None, ["model=m"]).data.seq_len == cfg.data.seq_len
