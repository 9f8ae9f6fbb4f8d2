"""The one sample-sheet parser (workflow and CLI): comments, checks and their messages."""

from __future__ import annotations

import pytest

from dirl.errors import ConfigError
from dirl.mil.data import read_sample_sheet
from dirl.samples import check_mil_labels, read_samples


def sheet(tmp_path, text: str):
    p = tmp_path / "samples.tsv"
    p.write_text(text)
    return p


def test_hash_is_a_comment_only_at_the_start_of_a_line(tmp_path):
    p = sheet(
        tmp_path,
        "# a comment before the header\n"
        "slide_id\tpath\tpatient_id\tlabel\n"
        "#s0\t/x.svs\tcase#0\tA\n"
        "s1\t/data/CMU#1.svs\tcase#1\tA\n"
        "\n"
        "s2\t/data/b.svs\tcase#2\tB\n",
    )
    rows = read_samples(p)
    assert [(s.slide_id, s.path, s.patient_id, s.label) for s in rows] == [
        ("s1", "/data/CMU#1.svs", "case#1", "A"),
        ("s2", "/data/b.svs", "case#2", "B"),
    ]
    # `dirl mil` reads the same rows: the commented one never reaches the splits
    co = read_sample_sheet(p)
    assert co.slide_ids == ["s1", "s2"] and co.patient_ids == ["case#1", "case#2"]


def test_defaults_and_optional_columns(tmp_path):
    rows = read_samples(sheet(tmp_path, "slide_id\tpath\tmpp\tlabel\ns1\ta.svs\t0.25\t\ns2\tb.svs\t\tX\n"))
    assert rows[0].patient_id == "s1" and rows[0].mpp == 0.25 and rows[0].label is None
    assert rows[1].mpp is None and rows[1].label == "X" and rows[1].line == 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("slide_id,path\ns1,a.svs\n", r"missing column\(s\) \['slide_id', 'path'\] \(is it tab-separated\?\)"),
        ("slide_id\tpath\tcolour\ns1\ta\tred\n", r"unknown column\(s\) \['colour'\]"),
        ("slide_id\tpath\n", "has no slides"),
        ("slide_id\tpath\ns1\ta\ns1\tb\n", r"the same slide_id 's1' \(line 2\) and 's1' \(line 3\)"),
        # tiles/S1.zarr and tiles/s1.zarr are one directory on macOS
        ("slide_id\tpath\nS1\ta\ns1\tb\n", r"slide_ids equal up to case 'S1' \(line 2\) and 's1' \(line 3\)"),
        # one slide under two ids would fall in two folds
        (
            "slide_id\tpath\ns1\tx/a.svs\ns2\tx/../x/a.svs\n",
            r"slides 's1' \(line 2\) and 's2' \(line 3\) are the same file",
        ),
        # "café" in NFC and in NFD, and a label typed two ways: one patient, one class each
        (
            "slide_id\tpath\tpatient_id\ns1\ta\tcaf\u00e9\ns2\tb\tcafe\u0301\n",
            "patient_id 'caf\u00e9' \\(line 2\\) and 'cafe\u0301' \\(line 3\\) differ only in case or Unicode form",
        ),
        ("slide_id\tpath\tlabel\ns1\ta\tTumour\ns2\tb\ttumour\n", r"label 'Tumour' \(line 2\) and 'tumour'"),
        ("slide_id\tpath\tnuclei\ns1\ta\t/n/{s}.geojson\n", r"line 2 \(s1\): nuclei '/n/\{s\}.geojson' contains"),
        ("slide_id\tpath\nbad id\ta\n", "line 2: slide_id 'bad id' may hold only"),
        ("slide_id\tpath\tmpp\ns1\ta\tnan\n", r"line 2 \(s1\): mpp 'nan' must be a positive number"),
        ("slide_id\tpath\tmpp\ns1\ta\tfast\n", "mpp 'fast' is not a number"),
        ("slide_id\tpath\ns1\t/data/{x}.svs\n", r"line 2 \(s1\): path '/data/\{x\}.svs' contains"),
        (
            "slide_id\tpath\tpatient_id\tlabel\ns1\ta\tP1\tA\ns2\tb\tP1\tB\n",
            r"patient 'P1' has two labels, 'A' \(line 2\) and 'B' \(line 3\)",
        ),
        ("slide_id\tpath\ns1\t\n", "line 2: empty path"),
    ],
)
def test_bad_sheets_get_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        read_samples(sheet(tmp_path, text))
    assert "\n" not in str(e.value)


def test_mil_label_checks(tmp_path):
    p = sheet(tmp_path, "slide_id\tpath\tlabel\ns1\ta\tA\ns2\tb\tA\ns3\tc\tB\n")
    rows = read_samples(p)
    check_mil_labels(p, rows, folds=1)
    with pytest.raises(ConfigError, match=r"label\(s\) \{'B': 1\} have fewer patients than mil.folds = 2"):
        check_mil_labels(p, rows, folds=2)
    with pytest.raises(ConfigError, match="only one label"):
        check_mil_labels(p, rows[:2], folds=1)
