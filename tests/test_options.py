"""A command's own flags from one dataclass (`options.add_flags(defaults=True)` / `options.from_args`): positional
arguments, required flags, switches, checks and help read from the fields, and the same check for a recipe value."""

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from cav import options
from cav.errors import CavError
from cav.options import REQUIRED, at_least, option


@dataclass
class Demo:
    clips: list[str] = option(REQUIRED, "the clips", positional=True)
    prompt: str = option(REQUIRED, "what they show")
    count: int = option(4, "how many", unit="videos", check=at_least(1))
    size: Literal["full", "tiny"] = option("full", "model size")
    out: str | None = option(None, "output folder", metavar="DIR", default_text="beside the clips")
    note: str = option("x", lambda: "text " + "built late")
    estimate: bool = option(True, "time a few steps")
    json: bool = option(False, "JSON output")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo", exit_on_error=False)
    options.add_flags(p, Demo, defaults=True)
    return p


def test_flags_of_a_command_come_from_its_fields():
    actions = {a.dest: a for a in _parser()._actions}
    assert actions["clips"].option_strings == [] and actions["clips"].nargs == "+"
    assert actions["prompt"].required and actions["prompt"].default is None
    assert actions["count"].default == 4 and actions["count"].help == "how many [default: 4 videos]"
    assert actions["size"].metavar == "{full,tiny}"
    assert actions["out"].metavar == "DIR" and actions["out"].help == "output folder [default: beside the clips]"
    assert actions["note"].help == "text built late [default: x]"
    assert isinstance(actions["estimate"], argparse.BooleanOptionalAction)
    assert actions["estimate"].help == "time a few steps [default: on]"
    assert isinstance(actions["json"], argparse._StoreTrueAction) and actions["json"].help == "JSON output"


def test_parsed_flags_read_back_as_the_dataclass():
    args = _parser().parse_args(["a.mp4", "b.mp4", "--prompt", "p", "--count", "2", "--size", "tiny", "--no-estimate"])
    assert options.from_args(Demo, args) == Demo(clips=["a.mp4", "b.mp4"], prompt="p", count=2, size="tiny",
                                                 estimate=False)
    defaults = options.from_args(Demo, _parser().parse_args(["a.mp4", "--prompt", "p"]))
    assert (defaults.count, defaults.out, defaults.estimate, defaults.json) == (4, None, True, False)


@pytest.mark.parametrize("value, reason", [("0", "0 is not a whole number ≥ 1"), ("two", "'two' is not a whole number"),
                                           ("1.5", "'1.5' is not a whole number")])
def test_a_bad_flag_value_is_refused_with_its_reason(value, reason):
    with pytest.raises(argparse.ArgumentError, match=reason):
        _parser().parse_args(["a.mp4", "--prompt", "p", "--count", value])


def test_the_check_is_the_same_for_a_recipe_value():
    assert options.typed(Demo, {"count": "3"}) == {"count": 3}
    with pytest.raises(CavError, match=r"^count \(--count\): 0 is not a whole number ≥ 1$"):
        options.typed(Demo, {"count": 0})
