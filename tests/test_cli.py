"""support/cli.py: flags that declare their range, and output folders kept by train.py's rules."""
import json
import os

import pytest

from support.cli import (ArgumentParser, OutputFolder, file_identity, fingerprint, number, number_list, replace_files,
                         run_cli, seed_flag)


def parse_error(parser, argv, capsys):
    """(exit status, stderr) of a parse that fails."""
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(argv)
    return stop.value.code, capsys.readouterr().err


def tool():
    p = ArgumentParser(prog="tool")
    p.add_argument("--steps", type=number(int, lo=1))
    p.add_argument("--keep", type=number(int, lo=0))
    p.add_argument("--top-p", type=number(float, lo=0, hi=1, lo_open=True))
    p.add_argument("--eta", type=number(float, lo=0))
    p.add_argument("--tau", type=number(float, lo=0, lo_open=True))
    p.add_argument("--layer", type=number(int, lo=-1, hi=7))
    p.add_argument("--seed", type=seed_flag)
    p.add_argument("--list", type=number_list(int, lo=1))
    p.add_argument("--dtype", choices=["bf16", "fp32"])
    return p


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "tool: error: --steps must be a positive integer, got 0"),
    (["--steps", "1.5"], "tool: error: --steps must be a positive integer, got 1.5"),
    (["--steps", "ten"], "tool: error: --steps must be a positive integer, got ten"),
    (["--steps", ""], "tool: error: --steps must be a positive integer, got ''"),
    (["--steps", "1e20"], "tool: error: --steps must be a positive integer below 2**63, got 1e20"),
    (["--steps", "9223372036854775808"],
     "tool: error: --steps must be a positive integer below 2**63, got 9223372036854775808"),
    (["--steps", "inf"], "tool: error: --steps must be a positive integer, got inf"),
    (["--keep", "-1"], "tool: error: --keep must be 0 or a positive integer, got -1"),
    (["--top-p", "0"], "tool: error: --top-p must be a number in (0, 1], got 0"),
    (["--top-p", "1.01"], "tool: error: --top-p must be a number in (0, 1], got 1.01"),
    (["--top-p", "nan"], "tool: error: --top-p must be a number in (0, 1], got nan"),
    (["--eta", "-0.5"], "tool: error: --eta must be a finite number >= 0, got -0.5"),
    (["--eta", "1e400"], "tool: error: --eta must be a finite number >= 0, got 1e400"),
    (["--eta", "inf"], "tool: error: --eta must be a finite number >= 0, got inf"),
    (["--tau", "0"], "tool: error: --tau must be a finite number > 0, got 0"),
    (["--layer", "8"], "tool: error: --layer must be a whole number in [-1, 7], got 8"),
    (["--seed", "-1"], "tool: error: --seed must be a whole number in [0, 2**63), got -1"),
    (["--seed", str(2**63)], f"tool: error: --seed must be a whole number in [0, 2**63), got {2**63}"),
    (["--seed", str(2**70)], f"tool: error: --seed must be a whole number in [0, 2**63), got {2**70}"),
    (["--list", "10,0"], "tool: error: --list must be a positive integer, or several separated by commas, got 10,0"),
    (["--list", ","], "tool: error: --list must be a positive integer, or several separated by commas, got ,"),
    (["--dtype", "fp8"], "tool: error: argument --dtype: invalid choice: 'fp8' (choose from 'bf16', 'fp32')"),
    (["--nonsense"], "tool: error: unrecognized arguments: --nonsense"),
    (["--steps"], "tool: error: argument --steps: expected one argument"),
])
def test_a_bad_flag_is_one_line_naming_the_flag_and_exit_status_2(argv, message, capsys):
    status, err = parse_error(tool(), argv, capsys)
    assert status == 2 and err == message + "\n"  # one line: no usage, no traceback


def test_numbers_in_range_are_parsed_to_their_kind():
    a = tool().parse_args(["--steps", "1e3", "--keep", "0", "--top-p", "1", "--eta", "0", "--tau", "1e-9",
                           "--layer", "-1", "--seed", str(2**63 - 1), "--list", " 10, 50 ,100"])
    assert (a.steps, a.keep, a.top_p, a.eta, a.tau, a.layer, a.seed, a.list) == \
        (1000, 0, 1.0, 0.0, 1e-9, -1, 2**63 - 1, [10, 50, 100])
    assert type(a.steps) is int and type(a.top_p) is float


def test_run_cli_turns_a_users_mistake_into_one_line(capsys):
    def main(argv):
        raise ValueError("--data x holds no examples: prepare it again")
    with pytest.raises(SystemExit) as stop:
        run_cli(main, "tool", [])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "tool: error: --data x holds no examples: prepare it again\n"


# -----------------------------------------------------------------------------
# fingerprints


def test_file_identity_changes_with_what_a_folder_holds(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"a": 1}')
    (tmp_path / "m" / "weights").write_bytes(b"\0" * 100)
    (tmp_path / "m" / ".lock").write_text("pid 1")
    before = file_identity(tmp_path / "m")
    assert set(before) == {"config.json", "weights"}  # hidden files (.lock) are not content
    (tmp_path / "m" / ".lock").write_text("pid 2")
    assert file_identity(tmp_path / "m") == before
    (tmp_path / "m" / "config.json").write_text('{"a": 2}')  # same size, other bytes
    assert file_identity(tmp_path / "m") != before
    import support.cli
    monkeypatch.setattr(support.cli, "HASHED_BYTES", 10)  # larger files count by size and modification time
    big = file_identity(tmp_path / "m")["weights"]
    assert set(big) == {"size", "mtime_ns"}
    os.utime(tmp_path / "m" / "weights", ns=(1, 1))
    assert file_identity(tmp_path / "m")["weights"] != big


def test_fingerprint_is_of_the_parts_and_their_order():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})  # dict order does not matter
    assert fingerprint([1, 2]) != fingerprint([2, 1])
    assert fingerprint("x", None) != fingerprint("x")
    assert len(fingerprint()) == 64


# -----------------------------------------------------------------------------
# output folders


def test_a_failed_run_removes_the_folder_it_created_and_its_staging(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="bad input"):
        with OutputFolder(out, "--out") as folder:
            staging = folder.staging("dataset")
            open(os.path.join(staging, "tokens.bin"), "wb").write(b"1234")
            raise ValueError("bad input")
    assert not out.exists()


def test_a_failed_run_leaves_an_existing_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text('{"fingerprint": "old"}')
    with pytest.raises(ValueError):
        with OutputFolder(out, "--out") as folder:
            folder.staging("dataset")
            raise ValueError("bad input")
    assert sorted(os.listdir(out)) == [".lock", "meta.json"]
    assert (out / "meta.json").read_text() == '{"fingerprint": "old"}'


def test_one_writer_at_a_time_and_what_killed_runs_left_is_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-dataset").mkdir()  # a killed run's staging and temporary file
    (out / ".tmp-meta.json-x1").write_text("{")
    with OutputFolder(out, "--out") as folder:
        assert sorted(os.listdir(out)) == [".lock"]
        assert not folder.done("meta.json", "k")
        with pytest.raises(ValueError, match="in use by another"):
            with OutputFolder(out, "--out"):
                pass
        (out / "meta.json").write_text(json.dumps({"fingerprint": "k"}))
        assert folder.done("meta.json", "k") and not folder.done("meta.json", "other")
    with OutputFolder(out, "--out"):  # released when the first run ended
        pass


def test_an_output_that_is_a_file_is_refused_untouched(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(ValueError, match="--output .* is a file: give a folder"):
        OutputFolder(tmp_path / "out", "--output").__enter__()
    assert (tmp_path / "out").read_text() == "mine"


def test_replace_files_swaps_the_whole_set_marker_last(tmp_path, monkeypatch):
    target, staging = tmp_path / "ds", tmp_path / "ds" / ".tmp-new"
    staging.mkdir(parents=True)
    for name, text in (("meta.json", "old meta"), ("a.bin", "old a"), ("old_only.bin", "old"), ("user.txt", "kept")):
        (target / name).write_text(text)
    for name in ("meta.json", "a.bin", "b.bin"):
        (staging / name).write_text(f"new {name}")
    moves = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moves.append(os.path.basename(dst)), real(src, dst)))
    replace_files(staging, target, "meta.json", old=["a.bin", "old_only.bin"])
    assert moves[-1] == "meta.json" and sorted(moves) == ["a.bin", "b.bin", "meta.json"]
    assert sorted(os.listdir(target)) == ["a.bin", "b.bin", "meta.json", "user.txt"]  # not listed: not touched
    assert (target / "a.bin").read_text() == "new a.bin" and not staging.exists()


def test_a_replace_stopped_halfway_leaves_no_marker(tmp_path, monkeypatch):
    """Killed between two moves, the folder has no marker: a reader is told the result is unfinished,
    never shown the old meta.json over a mix of old and new files."""
    target, staging = tmp_path / "ds", tmp_path / "ds" / ".tmp-new"
    staging.mkdir(parents=True)
    (target / "meta.json").write_text("old")
    (target / "a.bin").write_text("old a")
    (staging / "a.bin").write_text("new a")
    (staging / "meta.json").write_text("new")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        replace_files(staging, target, "meta.json", old=["a.bin"])
    assert not (target / "meta.json").exists()
