"""core/files.py: files a user points the project at are read only when they are regular files
within a size limit, UTF-8, and JSON nested within a depth limit; every refusal is one line."""

from __future__ import annotations

import json
import os
import time

import pytest

from diffsample.core.files import (json_array, json_depth, json_int, json_number, json_numbers, json_object,
                                   parse_json, read_json, read_text, regular_file)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < 400, text
    return text


def test_regular_file_refuses_directories_fifos_devices_and_large_files(tmp_path):
    good = tmp_path / "a.json"
    good.write_text("{}")
    assert regular_file(good, "x") == good
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/zero", tmp_path / "zero")
    for name, kind in [("d", "directory"), ("fifo", "FIFO"), ("zero", "character device")]:
        with pytest.raises(ValueError) as exc:
            regular_file(tmp_path / name, "target file")
        assert kind in one_line(exc) and "target file" in str(exc.value) and name in str(exc.value)
    with pytest.raises(ValueError, match="more than the limit of 1 bytes"):
        regular_file(good, "x", max_bytes=1)
    with pytest.raises(FileNotFoundError, match="not found"):
        regular_file(tmp_path / "missing", "x")


def test_read_never_blocks_on_a_fifo_or_reads_a_device_without_end(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    start = time.perf_counter()
    for name in ("fifo.json", "zero.json"):
        with pytest.raises(ValueError, match="not a regular file"):
            read_json(tmp_path / name, "cache")
    assert time.perf_counter() - start < 5


def test_text_must_be_utf8(tmp_path):
    (tmp_path / "u16.json").write_bytes('{"0": 1}'.encode("utf-16"))
    (tmp_path / "bin").write_bytes(bytes(range(256)))
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}')
    for name in ("u16.json", "bin"):
        with pytest.raises(ValueError) as exc:
            read_text(tmp_path / name, "cache")
        assert "not UTF-8" in one_line(exc) and name in str(exc.value)
    assert read_json(tmp_path / "bom.json", "x") == {"a": 1}


def test_json_depth_counts_brackets_outside_strings():
    assert json_depth("1") == 0
    assert json_depth('{"a": [1, {"b": []}]}') == 4
    assert json_depth('["[[[[", "}}}"]') == 1
    assert json_depth('["\\"[[[", 1]') == 1  # escaped quote inside the string
    assert json_depth("[" * 1000, limit=10) == 11  # stops once past the limit


def test_deep_nesting_is_refused_before_parsing(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    start = time.perf_counter()
    with pytest.raises(ValueError) as exc:
        read_json(path, "target marginal file")
    assert "nested more than 64 levels" in one_line(exc) and "deep.json" in str(exc.value)
    assert time.perf_counter() - start < 5
    assert parse_json("[" * 64 + "]" * 64, "x") == eval("[" * 64 + "]" * 64)


@pytest.mark.parametrize("text, message", [("{", "line 1 column 2"), ('{"a": NaN}', "NaN"),
                                           ("[Infinity]", "Infinity"), ("", "line 1 column 1")])
def test_invalid_json_is_one_line(text, message):
    with pytest.raises(ValueError) as exc:
        parse_json(text, "the file 'f'")
    assert message in one_line(exc) and "the file 'f'" in str(exc.value)


def test_schema_helpers():
    assert json_object({"a": 1}, "x") == {"a": 1}
    assert json_array([1], "x") == [1]
    assert json_numbers([1, 2.5], "x") == [1.0, 2.5]
    assert json_int(3, "x", 0) == 3 and json_number(2, "x") == 2.0
    cases = [(json_object, [1, 2, 3], "must be a JSON object {...}, got array [1, 2, 3]"),
             (json_object, None, "got null"),
             (json_array, {"a": 1}, 'got object {"a": 1}'),
             (json_numbers, [{"a": 1}, 2], 'x 0 must be a number, got object {"a": 1}'),
             (json_number, True, "got true"),
             (json_number, "1", 'got string "1"'),
             (json_int, 1.0, "must be an integer, got number 1.0"),
             (json_int, False, "got false")]
    for fn, value, message in cases:
        with pytest.raises(ValueError) as exc:
            fn(value, "x")
        assert message in one_line(exc), (fn.__name__, value, str(exc.value))
    with pytest.raises(ValueError, match=">= 0"):
        json_int(-1, "x", 0)
    assert json.loads("1e400") == float("inf")  # Python's parser overflows to inf ...
    with pytest.raises(ValueError, match="finite"):
        json_number(json.loads("1e400"), "x")  # ... which the schema refuses


def test_every_json_reader_of_the_project_refuses_deep_nesting_in_one_line(tmp_path):
    """Jeffrey targets, marginal files, CSFlow spectra, CLIP configs and model-folder configs go
    through core/files: a 200,000-deep file is one ValueError line, not a RecursionError."""
    from diffsample.guidance.jeffrey.class_marginal import load_marginal, parse_target
    from diffsample.run.models import scheduler_config
    from diffsample.solvers.spectrum import load_spectrum

    deep = "[" * 200_000 + "]" * 200_000
    path = tmp_path / "deep.json"
    path.write_text(deep)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(deep)
    for read in (lambda: parse_target(str(path), 3), lambda: load_marginal(path), lambda: load_spectrum(path),
                 lambda: scheduler_config(tmp_path)):
        with pytest.raises(ValueError, match="nested more than 64 levels") as exc:
            read()
        one_line(exc)
