"""Outputs of the ``abfp`` commands: refused when they exist unless ``--force``, then replaced
atomically with ordinary file permissions; the files a report writes are known beforehand; the CLI
helpers import no command module (no import cycle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from abfp.cli import main
from abfp.evaluate.report import report_files, write_report
from abfp.outputs import atomic_path, atomic_write_text

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _records(models: int = 1, noises: tuple[float, ...] = (0.0, 0.5), layers: bool = True) -> list[dict]:
    recs = []
    for m in range(models):
        recs.append({"model": f"net/{m}", "format": "fp32", "value": 90.0, "metric": "top1"})
        recs.append({"model": f"net/{m}", "format": "fixed", "value": 80.0, "metric": "top1", "tile_width": 128,
                     "gain": 1.0, "noise_std": noises[0]})
        for z in noises:
            for g in (1.0, 4.0):
                recs.append({"model": f"net/{m}", "format": "abfp", "value": 85.0 + g, "metric": "top1",
                             "tile_width": 32, "gain": g, "noise_std": z,
                             "layers": [{"site": "fc", "relative_error": 0.1, "saturated_fraction": 0.0}]
                             if layers else None})
    return recs


@pytest.mark.parametrize("models,noises,layers,html", [
    (1, (0.0, 0.5), True, False), (2, (0.3,), False, True), (1, (0.3,), True, True)])
def test_report_files_names_exactly_what_write_report_writes(tmp_path, models, noises, layers, html):
    recs = _records(models, noises, layers)
    write_report(recs, tmp_path / "out", html=html)
    assert sorted(report_files(recs, html=html)) == sorted(p.name for p in (tmp_path / "out").iterdir())


def test_report_refuses_an_existing_report_and_force_replaces_it(tmp_path, capsys):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_records()))
    out = tmp_path / "rep"
    out.mkdir()
    (out / "report.md").write_text("old")
    assert main(["report", str(src), "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err and (out / "report.md").read_text() == "old"
    assert main(["report", str(src), "--out", str(out), "--force"]) == 0
    assert (out / "report.md").read_text().startswith("# ABFP evaluation report")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_energy_json_force_overwrites_with_plain_permissions(tmp_path, capsys):
    out = tmp_path / "e.json"
    out.write_text("old")
    os.chmod(out, 0o640)
    assert main(["energy", "--json", str(out)]) == 2
    assert out.read_text() == "old"
    assert main(["energy", "--json", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["task"] == "fashion-cnn"
    assert out.stat().st_mode & 0o777 == 0o640  # the replaced file keeps its mode
    fresh = tmp_path / "new.json"
    assert main(["energy", "--json", str(fresh)]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would make it, not mkstemp's 0600


def test_atomic_path_keeps_the_old_file_on_failure_and_takes_a_suffix(tmp_path):
    target = tmp_path / "plot.png"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target, suffix=".tmp.png") as tmp:
            assert tmp.name.endswith(".tmp.png") and tmp.parent == tmp_path
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_summary_task_all_prints_one_table_per_task(monkeypatch, capsys):
    import abfp.zoo as zoo

    monkeypatch.setattr(zoo, "names", lambda: ["fashion-cnn", "fashion-vit"])
    assert main(["summary", "--task", "all", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "fashion-cnn on abfp" in out and "fashion-vit on abfp" in out


def test_cli_helpers_import_no_command_module():
    code = ("import sys, abfp.cli_common, abfp.finetune.cli, abfp.precision.cli; "
            "bad = [m for m in ('abfp.cli',) if m in sys.modules]; "
            "print(','.join(bad))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": SRC})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ""  # the command modules need only abfp.cli_common, never abfp.cli


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_a_folder_that_refuses_new_files_is_caught_before_the_work(tmp_path):
    """``os.access`` says yes to root on /proc, which refuses new files: eval, tune and explore
    ran to the end and then failed writing. The check creates (and removes) a file to be sure."""
    from abfp.outputs import OutputError, check_output, check_output_dir

    with pytest.raises(OutputError, match="cannot create a file in folder '/proc'|folder '/proc' is not writable"):
        check_output("/proc/abfp-out.json")
    with pytest.raises(OutputError, match="^output folder '/proc/abfp-out': cannot create a file in folder '/proc'"):
        check_output_dir("/proc/abfp-out", ["plan.json"])  # the folder as given, not a made-up '/proc/abfp-out/x'
    check_output(tmp_path / "new" / "x.json")
    check_output_dir(tmp_path / "d", ["a.json"])
    assert list(tmp_path.iterdir()) == []  # the probes leave nothing behind


def test_a_writer_that_makes_its_file_anew_still_gets_plain_permissions(tmp_path):
    """safetensors' save_file recreates the file it is given with 0600: tuned weights
    (plan.safetensors) came out unreadable to the group while the plan beside them was 0644."""
    import torch
    from safetensors.torch import save_file

    target = tmp_path / "w.safetensors"
    with atomic_path(target, suffix=".tmp.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask


def test_an_output_that_is_a_pipe_is_refused_even_with_force_and_left_a_pipe(tmp_path, capsys):
    """``--json fifo --force`` used to rename the records over the named pipe (as root, ``--json
    /dev/null --force`` would replace the device itself by a plain file)."""
    import stat

    from abfp.outputs import OutputError, check_output, check_output_dir

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert main(["energy", "--json", str(fifo), "--force"]) == 2
    assert "is not a regular file (a device, a pipe or a socket)" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(OutputError, match="not a regular file"):
        check_output_dir(tmp_path, ["fifo"], force=True)
    link = tmp_path / "link.json"
    os.symlink(fifo, link)
    with pytest.raises(OutputError, match="not a regular file"):
        check_output(link, force=True)
