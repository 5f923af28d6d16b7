"""Per-frame leakage and background-aware appearance accuracy on rendered toy videos (exact ground truth)."""

from dataclasses import replace

from cav.bench.metrics import BY_KEY, TABLE, Scored
from cav.data import toyworld as tw
from cav.metrics import toy as tm

REF = tw.ToySpec("circle", "red", "navy", "spiral", scale=0.3)
TARGET = tw.ToySpec("diamond", "magenta", "grey", "spiral", scale=0.3)


def test_frame_leakage_counts_the_frames_that_show_the_reference():
    target, _ = tw.render(TARGET, frames=8, size=32)
    ref, _ = tw.render(REF, frames=8, size=32)
    assert tm.frame_leakage(target, REF, TARGET) == 0.0
    mixed = target.copy()
    mixed[[0, -1]] = ref[[0, -1]]  # the reference's red circle on navy in the first and last frames
    assert tm.frame_leakage(mixed, REF, TARGET) == 0.25
    only_bg, _ = tw.render(replace(TARGET, background="navy"), frames=8, size=32)
    assert tm.frame_leakage(only_bg, REF, TARGET) == 1.0  # the background alone leaks


def test_appearance_ok_counts_the_background():
    target, _ = tw.render(TARGET, frames=8, size=32)
    wrong_bg, _ = tw.render(replace(TARGET, background="black"), frames=8, size=32)
    assert tm.appearance_ok(target, TARGET) and not tm.appearance_ok(wrong_bg, TARGET)


def test_new_metrics_are_appended_to_the_ablation_table():
    assert [m.key for m in TABLE[-2:]] == ["frame_leakage", "appearance_accuracy"]
    ref, _ = tw.render(REF, frames=8, size=32)
    s = Scored(ref, REF, tm.track(ref), TARGET)
    assert BY_KEY["frame_leakage"].fn(s) == 1.0 and BY_KEY["appearance_accuracy"].fn(s) == 0.0
