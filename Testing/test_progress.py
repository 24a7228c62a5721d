"""Progress reporting: a bar on a terminal, one plain line per stage in logs."""

import io

import pytest

from SegmentationDeepEditLib.progress import StageProgress


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
