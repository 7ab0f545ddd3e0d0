from dataclasses import dataclass

import pytest

from stages.common.errors import ConfigError
from stages.common.params import load_section, parse_section
from stages.common.schemas import SECTIONS, knob
from tests.helpers import REPO


@dataclass(frozen=True)
class Inner:
    train: int = knob(min=1)


@dataclass(frozen=True)
class Example:
    epochs: int = knob(min=1, max=100)
    rate: float = knob(min=0.0, min_exclusive=True)
    name: str = knob(choices=("a", "b"))
    limit: int | None = knob(min=1)
    flag: bool
    counts: Inner | None
    items: list[str] | None


@pytest.fixture(autouse=True)
def ex_section(monkeypatch):
    """`ex:` as a params section with the Example schema, for load_section."""
    monkeypatch.setitem(SECTIONS, "ex", Example)


GOOD = {"epochs": 3, "rate": 1, "name": "a", "limit": None, "flag": True, "counts": {"train": 2}, "items": ["x"]}


def test_valid_section_is_converted():
    params = parse_section(GOOD, Example, "ex")
    assert params.rate == 1.0 and isinstance(params.rate, float)
    assert params.counts == Inner(2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epoch": 3}, "unknown key 'ex.epoch'; did you mean 'ex.epochs'?"),
        ({"epochs": "ten"}, "'ex.epochs' is 'ten'; it must be an integer"),
        ({"epochs": True}, "it must be an integer"),
        ({"epochs": 0}, "'ex.epochs' is 0; it must be >= 1 and <= 100"),
        ({"rate": 0}, "it must be > 0.0"),
        ({"name": "c"}, "'ex.name' is 'c'; allowed values: a, b"),
        ({"limit": 0}, "'ex.limit' is 0; it must be >= 1"),
        ({"counts": {"train": 1, "tset": 2}}, "unknown key 'ex.counts.tset'"),
        ({"items": "x"}, "'ex.items' must be a list, got 'x'"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(change, message):
    raw = {**GOOD, **change}
    if "epoch" in change:
        del raw["epochs"]
    with pytest.raises(ConfigError) as err:
        parse_section(raw, Example, "ex")
    assert message in str(err.value)


def test_missing_key():
    raw = dict(GOOD)
    del raw["flag"]
    with pytest.raises(ConfigError, match="'ex.flag' is missing"):
        parse_section(raw, Example, "ex")


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("ex:\n  epochs: [1,\n  rate: 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_section("ex", path)


def test_missing_section_and_file(tmp_path):
    path = tmp_path / "params.yaml"
    with pytest.raises(ConfigError, match="not found"):
        load_section("ex", path)
    path.write_text("other: {}\n")
    with pytest.raises(ConfigError, match="no 'ex:' section"):
        load_section("ex", path)


def test_repo_params_yaml_is_valid_for_every_stage(monkeypatch):

    monkeypatch.delitem(SECTIONS, "ex")
    from stages.common.params import check_sections, read_params

    path = REPO / "params.yaml"
    assert set(SECTIONS) == set(read_params(path))  # every section has a schema, every schema a section
    for name in SECTIONS:
        load_section(name, path)
    check_sections(read_params(path), SECTIONS)  # train's model builds, too


def test_numbers_are_read_as_yaml_1_2_reads_them(tmp_path):
    """PyYAML (YAML 1.1) reads 5e-4 as a string; DVC (ruamel, YAML 1.2) as a number."""
    from stages.common.params import load_yaml

    path = tmp_path / "params.yaml"
    path.write_text("ex:\n  epochs: 5\n  rate: 5e-4\n  name: a\n  limit: 1_000\n  flag: true\n  counts: null\n"
                    "  items: [1e-3]\n")
    with pytest.raises(ConfigError, match=r"'ex.items\[0\]' is 0.001; it must be a string"):
        load_section("ex", path)  # the list item is a number, not the text '1e-3'
    path.write_text(path.read_text().replace("[1e-3]", "[x]"))
    params = load_section("ex", path)
    assert params.rate == 0.0005 and params.epochs == 5
    assert load_yaml("1e-3") == 0.001 and load_yaml("-2E+2") == -200.0 and load_yaml("7") == 7
    assert load_yaml("1.5") == 1.5 and load_yaml("abc") == "abc" and load_yaml(".inf") == float("inf")


def test_a_zero_validation_fraction_is_refused_up_front():
    from stages.common.schemas import PrepareParams

    raw = {"val_fraction": 0.0, "normalization": "standardize", "train_limit_per_class": None,
           "convert_images": False, "seed": 1}
    with pytest.raises(ConfigError, match=r"'prepare.val_fraction' is 0.0; it must be > 0.0"):
        parse_section(raw, PrepareParams, "prepare")


def test_flatten_gives_the_dotted_keys_overrides_use():
    from stages.common.params import flatten

    nested = {"train": {"epochs": 5, "augment": {"flip": True}, "arch": {"fast_vgg": {}}}, "report": {"dpi": 80}}
    assert flatten(nested) == {"train.epochs": 5, "train.augment.flip": True, "train.arch.fast_vgg": {},
                               "report.dpi": 80}
    assert flatten(3, "train.epochs") == {"train.epochs": 3}


def test_params_file_updates_keep_comments_and_replace_the_file_whole(tmp_path):
    from stages.common.params import update_params_file

    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 10   # how long\n  augment:\n    flip: true\n")
    inode = path.stat().st_ino
    update_params_file(path, {"train.epochs": 3, "train.augment": {"flip": False}})
    assert path.read_text() == "train:\n  epochs: 3    # how long\n  augment:\n    flip: false\n"
    assert path.stat().st_ino != inode  # written beside it, then moved into place
