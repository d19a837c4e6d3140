"""meshd.tunnel.throughput: the measurement script runs and reports sane numbers."""

from __future__ import annotations

import json

import pytest

from meshd.tunnel.throughput import main


def test_throughput_script_reports_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--packets", "256", "--batch", "64", "--runs", "1", "--json",
                 "--frame-size", "20000"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == 1400 and report["batch"] == 64
    names = [r["what"] for r in report["results"]]
    assert "encrypt + decrypt, one core" in names
    assert "20000-byte frames: both, one core" in names  # offload frames, 0xE4 fragments
    assert "20000-byte frames: decrypt whole reads (GRO)" in names  # one read per message
    assert all(r["packets_per_s"] > 0 for r in report["results"])


def test_throughput_script_text_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--packets", "64", "--batch", "16", "--runs", "1", "--size", "100"]) == 0
    assert "100-byte packets, batches of 16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--size", "10"])
    with pytest.raises(SystemExit):
        main(["--frame-size", "70000"])
