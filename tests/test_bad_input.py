"""Bad input, everywhere: one clear line on stderr, exit status 2, no traceback, no file touched.

The config parsers get property-based tests (hypothesis): whatever they are fed, they return a
valid Config / a table, or raise ConfigError, never anything else. The command line gets a list
of malformed inputs; each case checks stderr, the exit status and that no existing file changed.
Most cases call ``irnn.cli.main`` in this process (fast); a sample runs the real script in
subprocesses, in parallel.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irnn import registry
from irnn.cli import main
from irnn.config import Config, ConfigError, field_types, from_dict, load_file, validate

NAMES = [f.name for f in fields(Config)]


# -- property tests ----------------------------------------------------------------------------------
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([10**400, -(10**400), 2**63, 2**64, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["adam", "sgd", "irnn", "lstm", "gru", "quick", "paper", "seed", "cpu", "cuda", "cuda:0",
                     "cuda:x", "auto", "torch", "halves", "1e-3", "nan", "-inf", "-1", "0", "7", "1_000", "1.5",
                     "true", "no", "10:20:5", "wandb", "wandb,nope", "", ".", "a/b"]),
    st.dates(), st.binary(max_size=4),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3), st.dictionaries(st.text(max_size=4), _scalars,
                                                                              max_size=2))


def _field_value(name: str):
    """Values near the valid range of one field, as their type or as command-line strings."""
    typ = field_types()[name]
    if typ is bool:
        base = st.booleans()
    elif "int" in str(typ):
        base = st.integers(min_value=1, max_value=300)
    elif "float" in str(typ):
        base = st.floats(min_value=0.001, max_value=0.99)
    elif typ is dict:  # options: a table, of the run's model's options or not
        base = st.dictionaries(st.sampled_from(sorted(registry.all_options())), _scalars, max_size=1)
    else:
        meta = next(f.metadata for f in fields(Config) if f.name == name)
        choices = meta.get("choices")
        if meta.get("registry"):  # model or task: any registered name
            choices = registry.model_names() if meta["registry"] == "model" else registry.task_names()
        base = st.sampled_from(choices) if choices else st.text(max_size=8)
    # mostly in range (so that some configs pass), sometimes anything at all
    return st.one_of(base, base, base.map(str), _scalars)


_near_valid = st.lists(st.sampled_from(NAMES), max_size=6, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({n: _field_value(n) for n in names}))
_any_dict = st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=10), st.integers()), _values,
                            max_size=6)


def _check_from_dict(values) -> Config | None:
    try:
        cfg = from_dict(values)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return None
    assert isinstance(cfg, Config)
    validate(cfg)
    # what a run stores in config.json must load back to the same config on resume
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    return cfg


@settings(max_examples=300, deadline=None)
@given(st.one_of(_near_valid, _any_dict, _values))
def test_from_dict_returns_a_valid_config_or_raises_config_error(values):
    _check_from_dict(values)


def test_near_valid_strategy_also_produces_valid_configs():
    """The property above must not pass only because everything is rejected."""
    accepted = []

    @settings(max_examples=200, deadline=None, database=None)
    @given(_near_valid)
    def collect(values):
        if _check_from_dict(values) is not None:
            accepted.append(values)

    collect()
    assert len(accepted) > 20


_toml_bits = st.sampled_from(["lr = ", "seq_len = ", "[a]", "[[b]]", "= ", "\"", "'", "nan", "inf", "1e999", "0x1F",
                              "1979-05-27", "2001-13-45", "[", "]", "{", "}", ",", "\n", "#", "true", "model = \"x\"",
                              "\\u0000", "\t", "=", "a.b.c = 1", "preset = \"quick\""])
_yaml_bits = st.sampled_from(["lr: ", "seq_len: ", "- ", ": ", "? ", "&a ", "*a ", "!!python/object:os.system ",
                              "!!binary ", "2001-13-45", ".nan", ".inf", "[", "]", "{", "}", ",", "\n", "  ", "\t",
                              "#", "'", "\"", "|", ">", "---", "...", "%YAML 1.1", "<<: *a", "0o7", "1_0",
                              "seed: 2001-13-01", "preset: [1]"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([".toml", ".yaml", ".yml"]),
       st.one_of(st.binary(max_size=200),
                 st.lists(st.one_of(_toml_bits, _yaml_bits, st.text(max_size=5)), max_size=25)
                 .map(lambda parts: "".join(parts).encode("utf-8", "surrogatepass"))))
def test_load_file_returns_a_table_or_raises_config_error(tmp_path, suffix, data):
    path = tmp_path / ("cfg" + suffix)
    path.write_bytes(data)
    try:
        values = load_file(str(path))
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(values, dict)
    _check_from_dict(values)


def test_deep_nesting_is_a_config_error(tmp_path):
    for name, text in (("deep.yaml", "[" * 5000 + "]" * 5000), ("deep.toml", "a = " + "[" * 5000 + "]" * 5000)):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="nested too deeply|malformed"):
            load_file(str(tmp_path / name))


# -- the command line ------------------------------------------------------------------------------------
@pytest.fixture
def ws(tmp_path):
    """A workspace with an existing run, broken run folders and malformed config files."""
    existing = tmp_path / "existing"
    (existing / "checkpoints").mkdir(parents=True)
    (existing / "config.json").write_text(json.dumps({"config": Config(seq_len=10).to_dict()}))
    (existing / "metrics.jsonl").write_text('{"step": 10, "kind": "train", "train_loss": 0.2}\n')
    (existing / "summary.json").write_text(json.dumps({"status": "completed", "steps": 10}))
    (existing / "checkpoints" / "ckpt-000000010.pt").write_bytes(b"IRNNCKP1 not really")
    (tmp_path / "notrun").mkdir()
    for name, content in (("badjson", b"\xff\xfe{not json"), ("badschema", b'{"config": {"lr": "fast"}}'),
                          ("listjson", b"[1, 2]"), ("unknownkey", b'{"config": {"hiden_size": 3}}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_bytes(content)
    (tmp_path / "nosummary").mkdir()
    (tmp_path / "nosummary" / "config.json").write_text(json.dumps({"config": {}}))
    (tmp_path / "badsummary").mkdir()
    (tmp_path / "badsummary" / "config.json").write_text(json.dumps({"config": {}}))
    (tmp_path / "badsummary" / "summary.json").write_text('{"status": "completed"}')
    files = {
        "bad.toml": "lr = = 1\n", "bad.yaml": "lr: [1, 2\n", "unknown.toml": "hiden_size = 3\n",
        "str_for_float.toml": 'lr = "fast"\n', "float_for_int.toml": "hidden_size = 1.5\n",
        "list_for_int.yaml": "hidden_size: [1]\n", "bool_for_int.toml": "hidden_size = true\n",
        "nan.toml": "lr = nan\n", "nan.yaml": "lr: .nan\n", "inf.yaml": "clip_norm: .inf\n",
        "list.yaml": "- 1\n- 2\n", "empty.yaml": "", "date.yaml": "seed: 2001-13-01\n",
        "zero.toml": "steps = 0\n", "preset.toml": 'preset = "fastest"\n', "cfg.json": "{}", "tabs.yaml": "a:\n\t- 1\n",
        "python.yaml": "lr: !!python/object/apply:os.system ['true']\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "notutf8.toml").write_bytes(b"lr = \xff\xfe\n")
    (tmp_path / "afile").write_text("a file, not a folder")
    return tmp_path


def _cases(ws: Path) -> list[tuple[list[str], str]]:
    out = ["--out", str(ws / "runs")]
    train = [["train", *a, *out] for a in (
        ["--lr", "nan"], ["--lr", "inf"], ["--clip-norm", "inf"], ["--lr", "fast"], ["--lr", "-1"],
        ["--hidden-size", "1.5"], ["--hidden-size", "0"], ["--hidden-size", "[1]"], ["--steps", "true"],
        ["--train-size", "-5"], ["--test-size", "0"], ["--batch-size", "0"], ["--seq-len", "1"], ["--epochs", "0"],
        ["--momentum", "1"], ["--guard-lr-decay", "2"], ["--guard-factor", "nan"], ["--guard-retries", "-1"],
        ["--seed", "-1"], ["--seed", str(2**64)], ["--seed", "1e3"], ["--model", "transformer"],
        ["--optimizer", "lbfgs"], ["--preset", "fastest"], ["--variant", "sideways"], ["--engine", "warp"],
        ["--device", "tpu"], ["--device", "cuda:x"], ["--task", "imagenet"], ["--data-source", "web"],
        ["--name", "a/b"], ["--name", ".."], ["--track", "mlflow"], ["--inject-lr-spike", "soon"],
        ["--inject-lr-spike", "5:1:2"], ["--inject-spike", "soon"], ["--inject-spike", "-1:10"],
        ["--inject-spike", "5:inf"], ["--hiden-size", "3"], ["--guard", "maybe"], ["--quiet=maybe"],
        ["--variant", "hochreiter", "--seq-len", "3"], ["--threads", "100000"], ["--track", "wandb,wandb"],
        ["--steps", "99999999999999999999"],
        *(["--config", str(ws / f)] for f in (
            "bad.toml", "bad.yaml", "unknown.toml", "str_for_float.toml", "float_for_int.toml", "list_for_int.yaml",
            "bool_for_int.toml", "nan.toml", "nan.yaml", "inf.yaml", "list.yaml", "empty.yaml", "date.yaml",
            "zero.toml", "preset.toml", "cfg.json", "tabs.yaml", "python.yaml", "notutf8.toml", "missing.toml",
            "notrun")),
    )]
    cases = [(c, "") for c in train]
    cases += [
        (["train", "--steps"], "expected one argument"),
        # a study's or benchmark's name is checked before anything starts: '../x' would leave --out
        (["reproduce", "adding", "--name", "../up", "--out", str(ws / "studies")], "plain folder name"),
        (["reproduce", "mnist", "--name", "x y", "--out", str(ws / "studies")], "plain folder name"),
        (["benchmark", "--name", "../up", "--out", str(ws / "studies")], "plain folder name"),
        (["train", "--out", str(ws / "afile" / "runs")], "cannot create runs folder"),
        (["train", "--out", str(ws / "afile")], "cannot create runs folder"),
        (["train", "--out", "/proc/irnn-test-runs"], "cannot create runs folder"),
        (["train", "--out", str(ws), "--name", "existing"], "already exists"),
        (["train", "--resume", str(ws / "missing")], "does not exist"),
        (["train", "--resume", str(ws / "afile")], "not an irnn run folder"),
        (["train", "--resume", str(ws / "notrun")], "not an irnn run folder"),
        (["train", "--resume", str(ws / "badjson")], "not a valid irnn config"),
        (["train", "--resume", str(ws / "badschema")], "not a valid irnn config"),
        (["train", "--resume", str(ws / "listjson")], "not a valid irnn config"),
        (["train", "--resume", str(ws / "unknownkey")], "unknown config key"),
        (["train", "--resume", str(ws / "existing"), "--lr", "0.1"], "cannot change when resuming"),
        (["train", "--resume", str(ws / "existing"), "--hidden-size", "8"], "cannot change when resuming"),
        (["train", "--resume", str(ws / "existing"), "--steps", "0"], "steps must be > 0"),
        (["train", "--resume", str(ws / "existing"), "--steps", "many"], "steps must be an integer"),
        (["train", "--resume", str(ws / "existing"), "--config", str(ws / "zero.toml")], "cannot be used with --resume"),
        (["train", "--resume", str(ws / "existing"), "--overwrite"], "cannot be used with --resume"),
        (["show", str(ws / "missing")], "does not exist"),
        (["show", str(ws / "notrun")], "not an irnn run folder"),
        (["show", str(ws / "afile")], "not an irnn run folder"),
        (["show", str(ws / "nosummary")], "no readable summary"),
        (["show", str(ws / "badsummary")], "not an irnn summary"),
        (["show"], "required"),
        (["frobnicate"], "invalid choice"),
    ]
    if not torch.cuda.is_available():
        # the run that --overwrite would replace survives a run that cannot start
        cases.append((["train", "--out", str(ws), "--name", "existing", "--overwrite", "--device", "cuda"],
                      "CUDA is not available"))
    return cases


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_clean_error(argv, code, out, err, needle, before, ws) -> None:
    lines = err.splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("irnn"), (argv, err)
    assert "Traceback" not in err and needle in err, (argv, err)
    assert out == "", (argv, out)
    assert _snapshot(ws) == before, argv
    assert not (ws / "runs").exists() or not any((ws / "runs").iterdir()), argv


def test_every_bad_input_is_one_line_exit_2_and_touches_nothing(ws, capsys):
    before = _snapshot(ws)
    cases = _cases(ws)
    assert len(cases) > 80
    for argv, needle in cases:
        code = main(argv)
        captured = capsys.readouterr()
        _assert_clean_error(argv, code, captured.out, captured.err, needle, before, ws)


def test_bad_input_through_the_real_script(ws):
    """A sample of the cases in fresh processes: exit status and stderr as a user sees them."""
    before = _snapshot(ws)
    sample = [(["train", "--lr", "nan"], "lr must be a finite number"),
              (["train", "--config", str(ws / "bad.toml")], "malformed TOML"),
              (["train", "--out", str(ws), "--name", "existing"], "already exists"),
              (["train", "--resume", str(ws / "badjson")], "not a valid irnn config"),
              (["show", str(ws / "notrun")], "not an irnn run folder")]
    procs = [(argv, needle, subprocess.Popen([sys.executable, "-m", "irnn.cli", *argv, *(
        ["--out", str(ws / "runs")] if argv[0] == "train" and "--out" not in argv and "--resume" not in argv else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for argv, needle in sample]
    for argv, needle, proc in procs:
        out, err = proc.communicate(timeout=300)
        _assert_clean_error(argv, proc.returncode, out, err, needle, before, ws)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        from_dict({"hiden_size": 3})
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict({"x": 1, 2: 3})  # keys of mixed types (YAML) do not crash the message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", 10**400, "1e999"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError, match="lr must be a"):
        from_dict({"lr": value})
