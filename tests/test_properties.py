"""Property-based tests: every file-name / list-file / manifest parser of kdreid.data.datasets and the config
loader, fed arbitrary input, either return a well-formed result or raise their documented error (DatasetError,
ConfigError) — never anything else."""

import os
import string
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kdreid.config import from_dict, load_yaml, override
from kdreid.data.datasets.base import ImageRecord, parse_market_name
from kdreid.data.datasets.custom import read_manifest
from kdreid.data.datasets.msmt17 import parse_msmt_camera, read_list_file
from kdreid.data.datasets.synthetic import attach_manifest_tracklets
from kdreid.errors import ConfigError, DatasetError
from kdreid.stages.adapt import AdaptConfig
from kdreid.stages.distill import DistillConfig
from kdreid.stages.pipeline import PipelineConfig
from kdreid.stages.source import SourceConfig

# The machine is shared: no per-example deadline; 100 examples per property keep each test ~seconds.
# KDREID_HYPOTHESIS_EXAMPLES=2000 searches harder (what found the bugs fixed with these tests).
SETTINGS = settings(max_examples=int(os.environ.get("KDREID_HYPOTHESIS_EXAMPLES", "100")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text that looks like the names the parsers read, mixed with anything: digits of other scripts (٣, ²), signs,
# separators and the letters of the patterns make the interesting cases likely.
NAMEISH = st.text(alphabet=st.sampled_from(list("0123456789_-c.sfjpgCS ²٣\t/\\") + ["\x00", "é"]), max_size=40)
ANY_TEXT = st.one_of(NAMEISH, st.text(max_size=60))


@SETTINGS
@given(ANY_TEXT)
@example("0002_c1s1_000451_03.jpg")
@example("-1_c12s3_000001_01.jpg")
@example("0001_c²s1.jpg")
def test_market_names_parse_to_ints_or_none(name):
    parsed = parse_market_name(name)
    assert parsed is None or (len(parsed) == 2 and all(type(v) is int for v in parsed))
    if parsed is not None:
        pid, camid = parsed
        assert name.startswith(f"{pid}_c") or int(name.split("_")[0]) == pid


@SETTINGS
@given(ANY_TEXT)
@example("0000_000_01_0303morning_0015_0.jpg")
@example("0000_000_²_x.jpg")  # str.isdigit() is true for "²", int() refuses it
def test_msmt_camera_parses_to_an_int_or_none(name):
    camid = parse_msmt_camera(name)
    assert camid is None or (type(camid) is int and camid >= 0)


def _file(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


LIST_LINE = st.builds(
    lambda parts, pid: f"{'/'.join(parts)} {pid}",
    st.lists(NAMEISH, min_size=1, max_size=3), st.one_of(st.integers(-5, 5000).map(str), NAMEISH),
)
LIST_FILE = st.one_of(
    st.lists(LIST_LINE, max_size=8).map(lambda lines: "\n".join(lines).encode()),
    st.binary(max_size=200),  # not UTF-8, NUL bytes
)


@SETTINGS
@given(LIST_FILE)
@example(b"0001/0001_000_01_x.jpg 1\n0002/0002_000_\xff.jpg 2")
@example("0001/0001_000_01_x.jpg ²".encode())
def test_msmt_list_files_give_records_or_a_dataset_error(content):
    with tempfile.TemporaryDirectory() as folder:
        problems: list[str] = []
        try:
            records = read_list_file(_file(Path(folder), "list_train.txt", content), Path(folder), problems)
        except DatasetError as error:
            assert "\n" not in str(error)
            return
        assert all(isinstance(r, ImageRecord) and type(r.pid) is int and type(r.camid) is int for r in records)


CSV_CELL = st.one_of(NAMEISH, st.integers(-3, 30).map(str), st.sampled_from(["", "train/a.jpg", "query/b.jpg"]))
MANIFEST = st.one_of(
    st.builds(
        lambda header, rows: "\n".join([",".join(header)] + [",".join(row) for row in rows]).encode(),
        st.one_of(st.just(["path", "pid", "camid", "tracklet", "split"]), st.lists(CSV_CELL, max_size=6)),
        st.lists(st.lists(CSV_CELL, max_size=6), max_size=6),
    ),
    st.binary(max_size=200),
)


@SETTINGS
@given(MANIFEST)
@example(b"path,pid,camid\n\xff\xfe,1,2")  # not UTF-8
@example(b"path,pid,camid,tracklet\ntrain/a.jpg,1,2,\xc2\xb2")
def test_custom_manifests_give_records_or_a_dataset_error(content):
    with tempfile.TemporaryDirectory() as folder:
        problems: list[str] = []
        try:
            splits = read_manifest(Path(folder), _file(Path(folder), "manifest.csv", content), problems)
        except DatasetError as error:
            assert "\n" not in str(error)
            return
        assert set(splits) == {"train", "query", "gallery"}
        for records in splits.values():
            assert all(type(r.pid) is int and type(r.camid) is int and type(r.tracklet) is int for r in records)


@SETTINGS
@given(MANIFEST)
@example(b"path,pid,camid,tracklet\nbounding_box_train/0001_c1s1_000001_00.jpg,x,1,3")
@example(b"path,pid\nbounding_box_train/0001_c1s1_000001_00.jpg,1")  # a short row: camid is None
@example(b"pid,camid\n1,2")  # no path column
def test_synthetic_manifest_tracklets_attach_or_raise_a_dataset_error(content):
    with tempfile.TemporaryDirectory() as folder:
        domain = Path(folder)
        _file(domain, "manifest.csv", content)
        record = ImageRecord(str(domain / "bounding_box_train" / "0001_c1s1_000001_00.jpg"), 1, 1)
        problems: list[str] = []
        try:
            splits = attach_manifest_tracklets({"train": [record], "query": [], "gallery": []}, domain, problems)
        except DatasetError as error:
            assert "\n" not in str(error)
            return
        assert type(splits["train"][0].tracklet) is int


# ------------------------------------------------------------------------------------------------ configs
def _keys(cls, prefix=""):
    """Every dotted key of a config dataclass (nested sections included)."""
    out = []
    for f in fields(cls):
        hint = f.default_factory() if callable(getattr(f, "default_factory", None)) else None
        out.append(prefix + f.name)
        if is_dataclass(hint):
            out += _keys(type(hint), prefix + f.name + ".")
    return out


def _has_line_break(value) -> bool:
    """Whether a generated value holds a line break the error message may echo (keys are named as written)."""
    if isinstance(value, str):
        return any(c in value for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
    if isinstance(value, dict):
        return any(_has_line_break(k) or _has_line_break(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_line_break(v) for v in value)
    return False


CONFIGS = [SourceConfig, AdaptConfig, DistillConfig, PipelineConfig]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=10))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


@SETTINGS
@given(st.sampled_from(CONFIGS), st.data())
def test_config_from_any_mapping_is_a_config_or_a_config_error(cls, data):
    keys = [k.split(".")[0] for k in _keys(cls)]
    mapping = data.draw(st.one_of(
        VALUES, st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=8)), VALUES, max_size=4),
    ))
    try:
        config = from_dict(cls, mapping)
    except ConfigError as error:
        assert _has_line_break(mapping) or "\n" not in str(error)
        return
    assert isinstance(config, cls)


@SETTINGS
@given(st.sampled_from(CONFIGS), st.data())
def test_overrides_by_dotted_key_are_applied_or_a_config_error(cls, data):
    key = data.draw(st.one_of(st.sampled_from(_keys(cls)), st.text(max_size=12)))
    value = data.draw(VALUES)
    try:
        config = override(cls(), {key: value})
    except ConfigError as error:
        assert _has_line_break([key, value]) or "\n" not in str(error)
        return
    assert isinstance(config, cls)


YAML_TEXT = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.sampled_from(list(string.ascii_lowercase[:6]) + list(":-[]{}!&*#'\"\n 0123456789.")),
            max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["train:\n  epochs: 2001-02-30\n", "2001-02-30", "[" * 600, "train: &x [*x]",
                     "!!python/object/apply:os.system ['true']", "train: {height: 256x128}"]),
)


@SETTINGS
@given(st.sampled_from(CONFIGS), YAML_TEXT, st.booleans())
@example(SourceConfig, "train:\n  epochs: 2001-02-30\n", False)  # yaml builds a date: ValueError inside PyYAML
@example(SourceConfig, "[" * 600, False)  # PyYAML recurses per nesting level
@example(SourceConfig, "sources: [a]\n", True)  # not UTF-8 once re-encoded
def test_yaml_config_files_load_or_raise_a_config_error(cls, text, latin1):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass") + (b"\xff\xfe" if latin1 else b""))
        try:
            config = load_yaml(cls, path)
        except ConfigError as error:
            assert _has_line_break(text) or "\n" not in str(error)
            return
        assert isinstance(config, cls)


def test_the_documented_errors_are_what_the_loaders_say_they_raise():
    # A guard on the properties above: each documented error really is what a clearly bad input gives.
    with tempfile.TemporaryDirectory() as folder:
        with pytest.raises(DatasetError):
            read_manifest(Path(folder), _file(Path(folder), "m.csv", b""), [])
        with pytest.raises(ConfigError):
            load_yaml(SourceConfig, _file(Path(folder), "c.yaml", b"nonsense: 1\n"))
