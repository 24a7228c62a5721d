"""Progress reporting: a bar on a terminal, one plain line per stage in logs."""

import io

import pytest

from SegmentationDeepEditLib.progress import StageProgress, StepProgress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_each_stage_is_one_line():
    log = io.StringIO()
    with StageProgress("segment", stream=log) as p:
        p("prepare", 0.1)
        p("prepare", 0.2)  # same stage: no new line
        p("inference", 0.5)
        p("done", 1.0)
    assert log.getvalue() == "segment:  10% prepare\nsegment:  50% inference\nsegment: 100% done\n"


def test_on_a_terminal_a_bar_and_silent_when_disabled():
    tty = _Terminal()
    with StageProgress("segment", stream=tty) as p:
        p("inference", 0.5)
    assert "\r" in tty.getvalue() and "segment:" in tty.getvalue() and "inference" in tty.getvalue()  # redrawn in place
    quiet = io.StringIO()
    with StageProgress("segment", enabled=False, stream=quiet) as p:
        p("inference", 0.5)
    assert quiet.getvalue() == ""


def test_training_steps_off_a_terminal_are_a_line_now_and_then_and_one_at_the_end():
    log = io.StringIO()
    bar = StepProgress(range(2, 6), total=6, initial=2, desc="train", stream=log, every_s=3600)
    seen = []
    for step in bar:
        seen.append(step)
        bar.set_postfix(loss=f"{1.0 / (step + 1):.3f}")
    assert seen == [2, 3, 4, 5]
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 1, lines  # an hour between lines: only the end
    assert lines[0].startswith("train: 6/6 (100%) ") and lines[0].endswith(", loss=0.167"), lines
    bar.close()
    assert len(log.getvalue().splitlines()) == 1  # the end is not printed twice

    often = io.StringIO()
    with StepProgress(total=4, desc="loading cases", stream=often, every_s=0) as p:
        p.write("prepared case-1")
        for _ in range(4):
            p.update()
    assert [x.split(" (")[0] for x in often.getvalue().splitlines()] == [
        "prepared case-1", "loading cases: 1/4", "loading cases: 2/4", "loading cases: 3/4", "loading cases: 4/4"]


def test_training_steps_on_a_terminal_are_a_bar_and_nothing_when_disabled():
    tty = _Terminal()
    bar = StepProgress(range(3), total=3, desc="train", stream=tty)
    assert list(bar) == [0, 1, 2]
    bar.close()
    assert "\r" in tty.getvalue() and "train: 100%" in tty.getvalue()
    quiet = io.StringIO()
    bar = StepProgress(range(3), total=3, desc="train", stream=quiet, enabled=False, every_s=0)
    bar.write("prepared x")
    assert list(bar) == [0, 1, 2]
    bar.close()
    assert quiet.getvalue() == ""


@pytest.mark.realdata
def test_a_warning_in_a_log_starts_its_own_line(shared_data, tmp_path, capsys):
    from SegmentationDeepEditLib.cli import main

    ct = shared_data / "abdomen-ct" / "totalseg-example" / "ct.nii.gz"
    assert main(["segment", "--model", "liver-lesion", "--fast", "--input", f"ct={ct}", "-o", str(tmp_path / "o.nii.gz")]) == 0
    err = capsys.readouterr().err  # not a terminal, as in a log file
    lines = err.splitlines()
    assert "\r" not in err and any(x.startswith("segment: ") and x.endswith("% done") for x in lines), err
    warnings = [x for x in lines if "warning:" in x]
    assert warnings and all(x.startswith("deepedit segment: warning:") for x in warnings), err
