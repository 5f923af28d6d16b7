"""Format versions of cav's JSON records: old files read as version 1 and are upgraded in memory; newer are refused."""

import json

import pytest

from cav import versioned
from cav.adapters import lora
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
