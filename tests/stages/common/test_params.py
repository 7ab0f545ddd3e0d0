from dataclasses import dataclass

import pytest

from stages.common.errors import ConfigError
from stages.common.params import load_section, parse_section, whole_lists
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
    with pytest.raises(ConfigError, match=r"params.yaml, line 4, column 1: expected .*; fix the YAML there"):
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
    from stages.common.params import read_params
    from stages.common.run_params import check_sections

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

    raw = {"val_fraction": 0.0, "normalization": "standardize", "train_limit_per_class": None, "test_limit_per_class": None,
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


def alias_bomb(levels: int) -> str:
    """A few hundred bytes that expand to 9**levels strings (a 'billion laughs')."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(["train:", "  epochs: 1", "unused:", *(f"  {line}" for line in lines)]) + "\n"


@pytest.mark.parametrize(("text", "message"), [
    (alias_bomb(9), "params.yaml, line 5: alias '*a0': aliases are not allowed in params files; write the value out"),
    ("train:\n  epochs: 1\n  batch_size: 8\n  epochs: 2\n", "params.yaml, line 4: duplicate key 'epochs'"),
    ("x: " + "[" * 10_000 + "]" * 10_000 + "\n", "params.yaml, line 1: nested deeper than 32 levels"),
    ("train:\n  seed: " + "9" * 5000 + "\n", "params.yaml: Exceeds the limit"),
    ("x: !!python/object/apply:os.system [ls]\n", "params.yaml, line 1, column 4: could not determine a constructor"),
])
def test_hazardous_yaml_is_refused_in_one_line_in_bounded_time_and_memory(tmp_path, text, message):
    """An alias bomb under an unused key made `run` and `dvc status` hang past 1.7 GB; a duplicate
    key was read silently (last one wins) while DVC refused the file."""
    import time
    import tracemalloc

    from stages.common.run_params import check_overrides

    path = tmp_path / "params.yaml"
    path.write_text(text)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        check_overrides(path, {})
    seconds, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert str(err.value).startswith(f"{path}{message[len('params.yaml'):]}"), err.value
    assert "\n" not in str(err.value)
    assert seconds < 5 and peak < 64 * 2**20, (seconds, peak)


def test_oversized_and_binary_params_files_are_refused(tmp_path):
    from stages.common.params import read_params

    path = tmp_path / "params.yaml"
    path.write_text("train:\n  note: " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="bytes, more than a params file's"):
        read_params(path)
    path.write_bytes(b"train:\n  epochs: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_params(path)


def test_a_hand_typed_key_is_refused_before_anything_runs(tmp_path):
    """`batchsize: 32` typed into params.yaml by hand was found only by train, after the stages
    before it ran (and DVC had deleted train's outputs)."""
    from stages.common.run_params import check_overrides

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("  batch_size: 1024", "  batch_size: 1024\n  batchsize: 32"))
    with pytest.raises(ConfigError, match=r"unknown key 'train.batchsize'; did you mean 'train.batch_size'\?"):
        check_overrides(path, {})
    with pytest.raises(ConfigError, match=r"with --set evaluate.split='val'"):
        check_overrides(path, {"evaluate.split": "val"})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.seed": 2**32}, "'train.seed' is 4294967296; it must be >= 0 and <= 4294967295"),
    ({"prepare.seed": -1}, "'prepare.seed' is -1; it must be >= 0"),
    ({"prepare.train_limit_per_class": 5}, ("'prepare.train_limit_per_class' 5 with 'prepare.val_fraction' 0.1 "
                                           "leaves a class without a training or a validation image; use at least 6")),
    ({"prepare.train_limit_per_class": 1, "prepare.val_fraction": 0.5}, "use at least 2"),
    ({"download.classes": []}, "'download.classes' is []; list at least two distinct class names"),
    ({"download.classes": ["cat", "cat"]}, "list at least two distinct class names"),
    ({"download.md5": "abc"}, "'download.md5' is 'abc'; it must be 32 hex digits, or null"),
    ({"download.source": " "}, "'download.source' is empty"),
    ({"download.timeout_s": 1e9}, "'download.timeout_s' is 1000000000.0; it must be >= 1 and <= 86400"),
])
def test_values_the_libraries_refuse_are_refused_up_front(tmp_path, overrides, message):
    """train.seed=2**32 passed the checks, then train failed with 'unexpected ValueError' after the
    stages before it ran; a 5-image limit ended prepare in 'cannot reshape array of size 0'."""
    import shutil

    from stages.common.run_params import check_overrides

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ConfigError) as err:
        check_overrides(tmp_path / "params.yaml", overrides)
    assert message in str(err.value)


def test_a_source_too_small_to_split_is_a_data_error_naming_the_params():
    import numpy as np

    from stages.common.errors import DataError
    from stages.prepare import stratified_split

    with pytest.raises(DataError, match=r"class 1 has 3 training image\(s\), too few to split with "
                                        r"prepare.val_fraction 0.1; it needs at least 6"):
        stratified_split(np.array([0] * 20 + [1] * 3), 0.1, None, seed=0)


def test_set_values_rewrite_only_their_own_lines(tmp_path):
    """`-S train.epochs=3` turned `early_stopping: null` into `early_stopping:` and re-wrapped the
    fast_vgg flow mapping, lines nobody touched."""
    import difflib

    from stages.common.params import read_params, set_dotted, update_params_file

    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    updates = {"train.epochs": 3, "prepare.train_limit_per_class": 100, "train.learning_rate": 1e-3,
               "train.augment": {**read_params(path)["train"]["augment"], "flip": True},
               "train.arch.fast_vgg.widths": [8, 16], "download.source": "data: here #1"}
    expected = read_params(path)
    for key, value in updates.items():
        set_dotted(expected, key, value)
    update_params_file(path, updates)
    assert read_params(path) == expected  # what DVC and the stages read back
    changed = [line for line in difflib.unified_diff(original.splitlines(), path.read_text().splitlines(), n=0)
               if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
    removed = [line[1:].split(":")[0].strip() for line in changed if line.startswith("-")]
    # One line each, except fast_vgg's mapping, which was wrapped over two and is now one line.
    assert sorted(removed) == sorted(["epochs", "train_limit_per_class", "learning_rate", "flip", "fast_vgg",
                                      "bn_momentum", "source"]), changed
    assert "  early_stopping: null" in path.read_text()
    assert "  learning_rate: 0.001            # at batch 1024; the loss is the batch's mean\n" in path.read_text()


def test_a_sweep_key_can_name_one_item_of_a_list():
    params = {"train": {"arch": {"bn_cnn": {"widths": [64, 128, 96], "dense": 128}}, "epochs": 3}}
    point = {"train.arch.bn_cnn.widths.0": 32, "train.arch.bn_cnn.widths.2": 64, "train.epochs": 5}
    assert whole_lists(point, params) == {"train.arch.bn_cnn.widths": [32, 128, 64], "train.epochs": 5}
    assert params["train"]["arch"]["bn_cnn"]["widths"] == [64, 128, 96]  # params.yaml's values are not touched
    with pytest.raises(ConfigError, match=r"^sweep key 'train.arch.bn_cnn.widths.3': 'train.arch.bn_cnn.widths' "
                                          r"has 3 items in params.yaml, so its last is 'train.arch.bn_cnn.widths.2'$"):
        whole_lists({"train.arch.bn_cnn.widths.3": 8}, params)
    with pytest.raises(ConfigError, match=r"^sweep key 'train.epochs.0': 'train.epochs' is not a list in params.yaml"):
        whole_lists({"train.epochs.0": 8}, params)
