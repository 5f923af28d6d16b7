"""Format versions of cav's JSON records: old files read as version 1 and are upgraded in memory; newer are refused."""

import json
from pathlib import Path

import pytest
import yaml

from cav import versioned
from cav.adapters import lora
from cav.config import TrainConfig, dump_yaml, load_recipe
from cav.errors import CavError

OLD_META = {"kind": "temporal", "base": "tiny", "family": "unet3d", "prompt": "a red square moving right", "step": 4}


def test_a_hand_written_old_file_reads_as_it_was(tmp_path):
    """A ``cav.json`` written before versions (no key) is version 1, the shape cav still writes."""
    (tmp_path / "cav.json").write_text(json.dumps(OLD_META))
    assert lora.read_meta(tmp_path) == OLD_META
    lora_dir = tmp_path / "new"
    versioned.write(lora_dir / "cav.json", OLD_META)
    assert json.loads((lora_dir / "cav.json").read_text()) == {versioned.KEY: 1, **OLD_META}
    assert lora.read_meta(lora_dir) == OLD_META


def test_an_old_version_is_upgraded_step_by_step(tmp_path, monkeypatch):
    """With a version 2 and 3 of data.json (steps registered as a shape change would add them), a file without a
    version and one of version 2 both reach the current shape; a version-3 file reads as written."""
    monkeypatch.setitem(versioned.CURRENT, "data.json", 3)
    monkeypatch.setitem(versioned.UPGRADES, ("data.json", 1), lambda r: {**r, "clips": r.get("clips") or [r]})
    monkeypatch.setitem(versioned.UPGRADES, ("data.json", 2), lambda r: {"clips": r["clips"]})
    record = {"clip": "/v/a.mp4", "sha256": "ab", "selection": {}}
    path = tmp_path / "data.json"
    for written in (record, {versioned.KEY: 2, **record, "clips": [record]}):
        path.write_text(json.dumps(written))
        assert versioned.read(path) == {"clips": [record]}
    versioned.write(path, {"clips": [record]})
    assert json.loads(path.read_text()) == {versioned.KEY: 3, "clips": [record]}
    assert versioned.read(path) == {"clips": [record]}


@pytest.mark.parametrize("name", sorted(versioned.CURRENT))
def test_a_newer_or_unknown_version_is_refused_in_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps({versioned.KEY: versioned.CURRENT[name] + 1, "step": 1}))
    with pytest.raises(CavError, match=r"written by a newer cav .*: upgrade cav$") as exc:
        versioned.read(path)
    assert "\n" not in str(exc.value)
    for bad in ("1", 0, True, 1.5):
        path.write_text(json.dumps({versioned.KEY: bad}))
        with pytest.raises(CavError, match=rf"^'{path}' has {versioned.KEY} .*, not a version cav writes"):
            versioned.read(path)


FORMAT1 = Path(__file__).parent / "data" / "config-format1.yaml"  # a run's config.yaml from before sections


def test_a_flat_config_yaml_loads_to_the_same_config(tmp_path):
    """A config.yaml / recipe written before sections (format 1, flat keys; this one by main at a900387) is
    upgraded by the one reader to the same recipe as its nested form, and a run writes it back as format 2."""
    old = TrainConfig.from_dict(load_recipe(FORMAT1))
    assert old.validation.seed == 7 and old.validation.steps == 12 and old.validation.noise_prior == 0.3
    assert old.validation.prompts == ["a blue <cav> circle"] and old.validation.frames == 8
    assert old.validation.size == (32, 48) and old.validation.lora_weight == 0.75
    flat = yaml.safe_load(FORMAT1.read_text())
    keys, defaults = old.keys(), TrainConfig().keys()
    assert {k: keys[k] for k in flat} == flat  # every key of the old file, same value
    assert all(keys[k] == defaults[k] for k in set(keys) - set(flat))  # options added since: their defaults
    (tmp_path / "config.yaml").write_text(dump_yaml(old))
    again = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert next(iter(again)) == versioned.KEY and again[versioned.KEY] == versioned.CURRENT["config.yaml"] == 2
    assert again["validation"]["seed"] == 7 and "validation_seed" not in again
    assert TrainConfig.from_dict(load_recipe(tmp_path / "config.yaml")) == old


def test_a_newer_recipe_is_refused_in_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("format_version: 3\nprompt: x\n")
    with pytest.raises(CavError, match="written by a newer cav") as err:
        load_recipe(path)
    assert len(str(err.value).splitlines()) == 1
