"""Surplus from a results table: the paper's worked example, seeds, files, malformed input."""
from __future__ import annotations

import json
import math

import pytest

from kdprobe.errors import KdprobeError
from kdprobe.probes.surplus import compute_surplus, read_results_csv
from kdprobe.writers.surplus_files import write_surplus_csv, write_surplus_json

HEADER = "model,setting,train_type,unpruned,finetuned,post_distill,pre_post,self_distill\n"


def _write(tmp_path, body, name="results.csv"):
    p = tmp_path / name
    p.write_text(HEADER + body)
    return p


def test_worked_example_from_the_paper(tmp_path):
    # REFERENCE.md: ResNet-56 40/70/90, label KD: (73.30 - 70.06) - (73.76 - 71.23) = 0.71 points; the table is
    # in percent, read as fractions (docs/units.md): 0.0071
    p = _write(tmp_path, "resnet56,40/70/90,scratch,71.23,70.06,,,\n"
                         "resnet56,40/70/90,label,73.76,72.10,72.5,73.0,73.30\n")
    (r,) = compute_surplus(read_results_csv(p))
    assert (r.model, r.setting, r.kd_type) == ("resnet56", "40/70/90", "label")
    assert r.gain_unpruned == pytest.approx(0.0253)
    assert r.gain_pruned == pytest.approx(0.0324)
    assert r.surplus == pytest.approx(0.0071, abs=1e-11)
    assert r.surplus_se is None and r.unpruned_scratch_std is None  # one run each: no spread


def test_seeds_are_averaged_and_spread_propagated(tmp_path):
    p = _write(tmp_path, "\n".join([
        "r56,B,scratch,71,70,,,", "r56,B,scratch,72,69,,,", "r56,B,scratch,70,71,,,",
        "r56,B,label,74,,,,73", "r56,B,label,73,,,,74",
        "r56,B,feature,75,,,,", "# a comment line", "",
        "vgg,50%,scratch,90,89,,,", "vgg,50%,label,91,,,,90.5",
    ]) + "\n")
    rows = compute_surplus(read_results_csv(p))
    assert [(r.model, r.kd_type) for r in rows] == [("r56", "label"), ("r56", "feature"), ("vgg", "label")]
    lab, feat, vgg = rows
    # by hand, in percent: scratch unpruned mean 71, finetuned mean 70, KD unpruned 73.5, self-distill 73.5;
    # the results are fractions (/100)
    assert lab.surplus == pytest.approx(((73.5 - 70) - (73.5 - 71)) / 100)
    assert (lab.unpruned_scratch_n, lab.finetuned_scratch_n, lab.unpruned_kd_n, lab.self_distill_n) == (3, 3, 2, 2)
    assert lab.unpruned_scratch_std == pytest.approx(0.01)
    se2 = [1.0 / 3, 1.0 / 3, 0.5 / 2, 0.5 / 2]  # sample variances / n, in percent^2
    assert lab.surplus_se == pytest.approx(math.sqrt(sum(se2)) / 100)
    assert feat.gain_unpruned == pytest.approx(0.04) and feat.surplus is None and feat.self_distill_n == 0
    assert vgg.surplus == pytest.approx(((90.5 - 89) - (91 - 90)) / 100)

    write_surplus_csv(rows, tmp_path / "s.csv")
    write_surplus_json(rows, tmp_path / "s.json")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0].startswith("model,setting,kd_type,") and len(lines) == 4
    assert lines[2].split(",")[-2:] == ["", ""]  # undefined surplus -> blank cells
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["kind"] == "surplus" and doc["settings"]["formula"].startswith("surplus =")
    assert doc["data"][1]["surplus"] is None and doc["data"][0]["surplus"] == pytest.approx(0.01)


@pytest.mark.parametrize("body, line, words", [
    ("r56,B,scratch,71,70,,,\nr56,B,label,74,,,,abc\n", 3, "self_distill"),
    ("r56,B,scratch,71,70,,,\nr56,C,label,74,,,,73\n", 3, "scratch row"),
    ("r56,B,scratch,71,70,,,\nr56,B,label,74,73\n", 3, "fields"),
    ("r56,B,scratch,71,70,,,73\n", 2, "only unpruned and finetuned"),
    ("r56,B,scratch,71,70,,,\n\nr56,B,label,nan,,,,73\n", 4, "unpruned"),
    # issue 10 item 14: plain accuracies in one unit only
    ("r56,B,scratch,71,70,,,\nr56,B,label,1e308,,,,73\n", 3, "between 0 and 1 .*unpruned.*1e308"),
    ("r56,B,scratch,71,70,,,\nr56,B,label,inf,,,,73\n", 3, "expected a number.*'inf'"),
    ("r56,B,scratch,71,70,,,\nr56,B,label,-nan,,,,73\n", 3, "expected a number.*'-nan'"),
    ("r56,B,scratch,71,70,,,\nr56,B,label,7_1,,,,73\n", 3, "expected a number.*'7_1'"),
    ("r56,B,scratch,71,70,,,\nr56,B,label,\u0667\u0661,,,,73\n", 3, "expected a number"),  # Arabic-Indic 71
    ("r56,B,scratch,101,70,,,\n", 2, "between 0 and 1 .*101"),
    ("r56,B,scratch,-0.5,70,,,\n", 2, "between 0 and 1 "),
    ("r56,B,scratch,71.2,70,,,\nr56,B,label,0.74,,,,0.73\n", 3, "one unit.*unpruned=0.74.*unpruned=71.2 on line 2"),
])
def test_malformed_rows_name_file_and_line(tmp_path, body, line, words):
    p = _write(tmp_path, body)
    with pytest.raises(KdprobeError, match=f"results.csv:{line}:.*{words}"):
        read_results_csv(p)


def test_missing_columns_and_missing_file(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("model,setting,train_type,unpruned,finetuned\nr56,B,scratch,71,70\n")
    with pytest.raises(KdprobeError, match=r"bad.csv:1: .*missing post_distill, pre_post, self_distill"):
        read_results_csv(p)
    with pytest.raises(KdprobeError, match="not a file"):
        read_results_csv(tmp_path / "nope.csv")


def test_cli_surplus_prints_table_and_writes_files(tmp_path, capsys):
    from cli.surplus import surplus

    p = _write(tmp_path, "resnet56,40/70/90,scratch,71.23,70.06,,,\nresnet56,40/70/90,label,73.76,,,,73.30\n")
    surplus(p, csv=tmp_path / "o.csv", json=tmp_path / "o.json")
    out = capsys.readouterr().out
    assert "+0.0071" in out and "label" in out
    assert (tmp_path / "o.csv").exists() and (tmp_path / "o.json").exists()
    empty = _write(tmp_path, "resnet56,x,scratch,71,70,,,\n", name="empty.csv")
    with pytest.raises(KdprobeError, match="at least one KD row"):
        surplus(empty, csv=None, json=None)


# ---- issue 10 items 14 and 12: encodings, comments, strict numbers, units, duplicate columns ----

def test_bom_and_comment_lines_are_accepted(tmp_path):
    p = tmp_path / "results.csv"
    body = ("# exported from a spreadsheet, with a note: \"quoted, with commas\"\n" + HEADER +
            "  # a comment between rows\n"
            "resnet56,40/70/90,scratch,71.23,70.06,,,\n"
            "resnet56,40/70/90,label,73.76,,,,73.30\n")
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())  # UTF-8 with a byte-order mark (Excel's "CSV UTF-8")
    (r,) = compute_surplus(read_results_csv(p))
    assert r.surplus == pytest.approx(0.0071, abs=1e-11) and r.model == "resnet56"


def test_fractions_are_read_as_they_are_and_percents_converted(tmp_path, capsys):
    from cli.surplus import surplus

    p = _write(tmp_path, "resnet56,40/70/90,scratch,0.7123,0.7006,,,\nresnet56,40/70/90,label,0.7376,,,,0.7330\n")
    rows = read_results_csv(p)
    assert not any(r.from_percent for r in rows) and rows[0].unpruned == 0.7123
    assert compute_surplus(rows)[0].surplus == pytest.approx(0.0071, abs=1e-11)
    surplus(p, csv=None, json=None)
    out = capsys.readouterr()
    assert "+0.0071" in out.out and "note" not in out.err
    p = _write(tmp_path, "resnet56,40/70/90,scratch,71.23,70.06,,,\nresnet56,40/70/90,label,73.76,,,,73.30\n")
    rows = read_results_csv(p)
    assert all(r.from_percent for r in rows) and rows[0].unpruned == pytest.approx(0.7123, abs=1e-15)
    surplus(p, csv=None, json=None)
    out = capsys.readouterr()
    assert "+0.0071" in out.out and "divided by 100" in out.err


def test_duplicate_columns_are_refused(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text("model,setting,train_type,unpruned,finetuned,post_distill,pre_post,self_distill,unpruned\n"
                 "r56,B,scratch,71,70,,,,72\n")
    with pytest.raises(KdprobeError, match=r"results.csv:1: .*'unpruned' as fields 4 and 9"):
        read_results_csv(p)
    p.write_text("model,setting,train_type,unpruned,finetuned,post_distill,pre_post,self_distill,,\n"
                 "r56,B,scratch,71,70,,,,,\n")  # empty trailing names are not columns
    assert read_results_csv(p)[0].unpruned == 0.71


def test_other_encodings_and_huge_fields_are_one_line(tmp_path):
    p = tmp_path / "results.csv"
    p.write_bytes((HEADER + "r\u00e9snet,B,scratch,71,70,,,\n").encode("latin-1"))
    with pytest.raises(KdprobeError, match=r"results.csv:2: expected a UTF-8 CSV file, got byte 0xe9") as e:
        read_results_csv(p)
    assert "save the file as UTF-8" in str(e.value)
    p.write_bytes((HEADER + "r56,B,scratch,71,70,,,\n").encode("utf-16"))
    with pytest.raises(KdprobeError, match="UTF-16"):
        read_results_csv(p)
    p.write_text(HEADER + "r56,B,scratch,71,70,,,\n" + '"' + "x" * 200_000 + '",B,scratch,71,70,,,\n')
    with pytest.raises(KdprobeError, match=r"results.csv:\d+: expected a results table, got a field longer than "
                                           r"131,072 characters") as e:
        read_results_csv(p)
    assert "\n" not in str(e.value)
