"""Training progress off a terminal: whole lines, now and then, with tqdm's meter."""

import pytest

from dmd2_train.progress import LineProgress, progress


def test_a_log_file_gets_a_line_per_interval_and_one_at_the_end(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch):
    clock = [100.0]
    monkeypatch.setattr("dmd2_train.progress.time.monotonic", lambda: clock[0])
    bar = progress(1000, 200, "dmd2", "step", interval=30)  # a resumed run; stderr is pytest's capture, no terminal
    assert isinstance(bar, LineProgress)
    for _ in range(10):  # 10 steps, 1 s each: inside one interval
        clock[0] += 1
        bar.update(1)
    assert capsys.readouterr().err == ""
    bar.set_postfix({"dm": "0.41", "gan_generator": "0.72"})
    clock[0] += 21
    bar.update(1)
    said = capsys.readouterr().err
    # the rate counts this start's 11 steps in 31 s, not the 200 before it
    assert said == "dmd2: 211/1000 (21%) [00:31<37:03, 2.82s/step, dm=0.41, gan_generator=0.72]\n"
    bar.update(1)
    bar.close()  # the last count, once
    bar.close()
    assert capsys.readouterr().err.count("dmd2: 212/1000") == 1
