"""kdprobe compare: two study summaries number by number (kdprobe.studies.compare)."""
import copy
import json

import pytest
from typer.testing import CliRunner

from cli.main import app
from kdprobe.errors import KdprobeError
from kdprobe.studies.compare import compare, load_summary

BASE = {"format": "kdprobe-study", "name": "t", "created": "2026-01-01T00:00:00", "wall_seconds": 10.0,
        "source": "/a/spec.toml",
        "cells": [{"method": "scratch", "seed": 0, "test_acc": 51.63, "seconds": 3.0, "action": "trained",
                   "dataset": "imagefolder:/a/data.tar.gz"}],
        "accuracy": [{"group": "scratch", "mean": 52.946666666666665, "p_value": None, "ok": True}],
        "versions": {"torch": "2.14.1", "platform": "Linux-a",
                     "machine": {"cpu": "Intel(R) Xeon(R)", "cpu_capability": "AVX512", "threads": 2}}}


def _changed(**where):
    d = copy.deepcopy(BASE)
    for path, v in where.items():
        node = d
        *head, last = path.split("__")
        for k in head:
            node = node[int(k)] if k.isdigit() else node[k]
        node[int(last) if last.isdigit() else last] = v
    return d


def test_identical_summaries_are_the_same_and_every_leaf_is_counted():
    d = compare(BASE, copy.deepcopy(BASE))
    assert d.equal and not d.notes
    assert d.numbers == 6  # wall_seconds, seed, test_acc, seconds, mean, machine threads
    # format, name, created, source, method, action, dataset, group, p_value (None), ok (True), torch, platform,
    # machine cpu and cpu_capability
    assert d.strings == 14
    assert d.max_abs == 0


def test_a_changed_number_is_a_difference_with_its_place():
    d = compare(BASE, _changed(cells__0__test_acc=51.64))
    assert d.differences == [("cells[0].test_acc", 51.63, 51.64)]
    assert d.max_abs == pytest.approx(0.01) and d.max_rel == pytest.approx(0.01 / 51.64)


def test_tolerances_are_absolute_plus_relative():
    b = _changed(cells__0__test_acc=51.63 + 1e-9)
    assert not compare(BASE, b).equal
    assert compare(BASE, b, rtol=1e-9).equal
    assert compare(BASE, b, atol=2e-9).equal
    assert not compare(BASE, b, atol=1e-10, rtol=1e-12).equal


def test_run_to_run_fields_are_notes_not_differences():
    b = _changed(created="2027", wall_seconds=99.0, cells__0__seconds=4.5, cells__0__action="existing",
                 cells__0__dataset="imagefolder:/b/data.tar.gz", source="/b/spec.toml", versions__platform="Linux-b")
    b["cells"][0]["sha256"] = "b" * 64
    a = copy.deepcopy(BASE)
    a["cells"][0]["sha256"] = "a" * 64
    d = compare(a, b)
    assert d.equal and len(d.notes) == 8
    assert ("cells[0].action", "trained", "existing") in d.notes


def test_structure_changes_are_differences():
    b = copy.deepcopy(BASE)
    b["cells"].append(dict(b["cells"][0]))
    del b["accuracy"][0]["ok"]
    b["versions"]["torch"] = "2.15"
    b["name"] = ["t"]
    d = compare(BASE, b)
    assert ("cells (length)", 1, 2) in d.differences
    assert ("accuracy[0].ok", True, "<missing>") in d.differences
    assert ("versions.torch", "2.14.1", "2.15") in d.differences
    assert ("name", "str", "list") in d.differences


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    runner = CliRunner()
    a, b = tmp_path / "a", tmp_path / "b.json"
    a.mkdir()
    (a / "summary.json").write_text(json.dumps(BASE))
    b.write_text(json.dumps(_changed(accuracy__0__mean=53.0)))
    same = runner.invoke(app, ["compare", str(a), str(a / "summary.json")])
    assert same.exit_code == 0 and ": the same (" in same.output
    diff = runner.invoke(app, ["compare", str(a), str(b)])
    assert diff.exit_code == 1
    # BASE is a format-1 summary (flat, percent): both are read with their accuracies as fractions (docs/units.md)
    assert f"DIFF  accuracy[0].mean: {52.946666666666665 / 100!r} != {53.0 / 100!r}" in diff.output
    assert "DIFFERENT in 1 places" in diff.output
    junk = tmp_path / "junk.json"
    junk.write_text('{"format": "other"}')
    for bad, msg in ((junk, "is not a kdprobe study summary"), (tmp_path / "none", "does not exist")):
        r = runner.invoke(app, ["compare", str(a), str(bad)])
        assert r.exit_code == 1 and msg in r.output and len(r.output.strip().splitlines()) == 1
    with pytest.raises(KdprobeError, match="not valid JSON"):
        junk.write_bytes(b"\xff\xfe{")
        load_summary(junk)


def _other_machine(d=None, **fields):
    d = copy.deepcopy(BASE if d is None else d)
    d["versions"]["machine"].update(fields)
    return d


def test_same_machine_is_bit_equal_other_machine_gets_the_stated_tolerance():
    from kdprobe.studies.compare import CROSS_MACHINE_ATOL, CROSS_MACHINE_RTOL

    close = BASE["cells"][0]["test_acc"] * (1 + CROSS_MACHINE_RTOL / 10)  # a rounding-size change
    far = BASE["cells"][0]["test_acc"] * (1 + CROSS_MACHINE_RTOL * 10)  # a real change
    same = compare(BASE, _changed(cells__0__test_acc=close))
    assert not same.equal and same.tolerance.why == "same machine" and same.tolerance.bit_equal
    for fields in ({"cpu_capability": "AVX2"}, {"threads": 1}, {"cpu": "AMD EPYC"}):
        b = _other_machine(_changed(cells__0__test_acc=close), **fields)
        d = compare(BASE, b)
        assert d.equal, fields  # rounding-size changes pass ...
        assert (d.tolerance.rtol, d.tolerance.atol, d.tolerance.why) == (CROSS_MACHINE_RTOL, CROSS_MACHINE_ATOL,
                                                                         "machines differ")
        # ... the machine fields are notes (they chose the tolerance), and a real change is still a difference
        key = next(iter(fields))
        assert d.notes == [(f"versions.machine.{key}", BASE["versions"]["machine"][key], fields[key])]
        assert compare(BASE, _other_machine(_changed(cells__0__test_acc=far), **fields)).differences == [
            ("cells[0].test_acc", 51.63, far)]
        assert not compare(BASE, b, rtol=0, atol=0).equal  # bit-equality can still be asked for
    torch_b = _changed(cells__0__test_acc=close, versions__torch="2.15.0")  # same machine, other torch: not bits
    d = compare(BASE, torch_b)
    assert d.tolerance.why == "torch versions differ" and d.differences == [("versions.torch", "2.14.1", "2.15.0")]


def test_a_summary_without_a_machine_record_is_not_assumed_to_match():
    old = copy.deepcopy(BASE)
    del old["versions"]["machine"]  # summaries written before machines were recorded
    d = compare(old, _changed(cells__0__test_acc=51.63 * (1 + 1e-6)))
    assert d.equal and d.tolerance.why == "machine not recorded" and not d.tolerance.bit_equal
    assert d.notes == [("versions.machine", "<missing>", BASE["versions"]["machine"])]


def test_cli_states_the_tolerance_and_why(tmp_path):
    runner = CliRunner()
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(BASE))
    b.write_text(json.dumps(_other_machine(_changed(accuracy__0__mean=52.946666666666665 * (1 + 1e-6)),
                                           cpu_capability="AVX2")))
    c.write_text(json.dumps(_changed(accuracy__0__mean=52.946666666666665 * (1 + 1e-6))))
    r = runner.invoke(app, ["compare", str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "rtol 0.0001, atol 1e-06, not bit-equal: machines differ" in r.output
    assert "AVX512" in r.output and "AVX2" in r.output and "note  versions.machine.cpu_capability" in r.output
    r = runner.invoke(app, ["compare", str(a), str(c)])
    assert r.exit_code == 1 and "numbers compared bit-equal: both ran on Intel(R) Xeon(R) (AVX512, 2 threads)" in r.output
    r = runner.invoke(app, ["compare", str(a), str(b), "--rtol", "0"])
    assert r.exit_code == 1 and "numbers compared bit-equal (as given)" in r.output


def test_a_format_1_summary_is_read_in_fractions_like_today_s(tmp_path):
    from kdprobe.studies.result import upgraded

    (tmp_path / "summary.json").write_text(json.dumps(BASE))
    flat = load_summary(tmp_path)
    assert flat["cells"][0]["test_acc"] == 51.63 / 100 and flat["accuracy"][0]["mean"] == 52.946666666666665 / 100
    assert flat["accuracy"][0]["p_value"] is None and flat["cells"][0]["seed"] == 0  # not accuracies: unchanged
    doc = upgraded(BASE)
    assert doc["kind"] == "study" and doc["format_version"] == 2 and doc["data"]["cells"][0]["test_acc"] == 0.5163
    assert upgraded(doc) is doc  # today's form is left alone
