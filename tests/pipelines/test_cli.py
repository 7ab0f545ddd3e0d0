"""The CLI's one error handler: every command's failure is one line and its cause's exit code."""

from __future__ import annotations

import pytest
import typer

from pipelines import cli


def run_main(monkeypatch, capsys, body) -> tuple[int, str]:
    """cli.main() over a one-command app whose command runs `body`."""
    app = typer.Typer()

    @app.command()
    def command() -> None:
        body()

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr("sys.argv", ["cifar10-pipeline"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    return ended.value.code, capsys.readouterr().err


def test_ctrl_c_exits_130_not_aborted_1(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    code, err = run_main(monkeypatch, capsys, interrupted)
    assert code == 130 and err.strip().splitlines()[-1] == "error: interrupted"
    assert "Aborted!" not in err


def test_errors_end_in_one_line_with_their_code(monkeypatch, capsys):
    from stages.common.errors import ConfigError

    def bad_config():
        raise ConfigError("params.yaml: 'train.epochs' is 0; it must be >= 1")

    def bug():
        raise RuntimeError("dvc push: remote unreachable")

    assert run_main(monkeypatch, capsys, bad_config) == (2, "error: params.yaml: 'train.epochs' is 0; it must be >= 1\n")
    code, err = run_main(monkeypatch, capsys, bug)
    assert code == 1 and err.startswith("error: unexpected RuntimeError: dvc push: remote unreachable; rerun with ")
    assert len(err.strip().splitlines()) == 1
    assert run_main(monkeypatch, capsys, lambda: None) == (0, "")


def test_version_prints_the_installed_version(monkeypatch, capsys):
    from importlib.metadata import version

    monkeypatch.setattr("sys.argv", ["cifar10-pipeline", "--version"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 0 and capsys.readouterr().out == f"cifar10-pipeline {version('cifar10-pipeline')}\n"


@pytest.mark.parametrize("argv", [["frobnicate"], ["run", "--bogus"], ["api", "--port", "abc"], ["api", "--port", "70000"],
                                  ["server", "--port", "0"], ["run", "--lock-timeout", "-1"],
                                  ["predict", "--top-k", "0", "cat.png"], ["run", "--dry-run", "true"]])
def test_usage_errors_are_one_line_and_exit_2(monkeypatch, capsys, argv):
    """typer 0.26+ raises its own copy of Click's UsageError: caught as Click's, it ended as
    'unexpected UsageError', exit 1."""
    monkeypatch.setattr("sys.argv", ["cifar10-pipeline", *argv])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    err = capsys.readouterr().err
    assert ended.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "--help'" in err, err
    assert "unexpected UsageError" not in err and "cifar10-pipeline " in err


def test_help_shows_flags_as_flags(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["cifar10-pipeline", "run", "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as ended:
        cli.main()
    out = capsys.readouterr().out
    assert ended.value.code == 0 and "--dry-run" in out
    assert "<bool>" not in out, out


@pytest.mark.slow
def test_server_serves_its_own_port_from_prefect_home_and_stops_whole(tmp_path):
    """`server --port 4311` left the UI pointing at 4200, ignored $PREFECT_HOME, and SIGTERM left
    its `prefect server start` child holding the port."""
    import os
    import signal
    import subprocess

    import httpx
    import psutil

    from tests.helpers import BIN, free_port, serving

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([str(BIN / "cifar10-pipeline"), "server", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert serving(f"http://127.0.0.1:{port}/api/health", proc, timeout_s=120), proc.stdout.read()
        assert httpx.get(f"http://127.0.0.1:{port}/ui-settings").json()["api_url"] == f"http://127.0.0.1:{port}/api"
        assert (tmp_path / "home" / "prefect.db").is_file()
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_dry_run_on_a_fresh_clone_says_never_run_once_without_prefect(tmp_path):
    """It said every dependency was 'modified' (there is no dvc.lock yet), twice (Prefect's log and
    the CLI), and took 37 s starting Prefect where `status` took 1.7 s."""
    import os
    import time

    from tests.helpers import STAGES, cli, git_dvc_project

    repo = git_dvc_project(tmp_path / "project")
    before = (repo / "params.yaml").read_bytes()
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    started = time.monotonic()
    result = cli(env, "run", "--dry-run", "--repo", str(repo), "--set", "train.epochs=2")
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{stage}: will run: never run here (dvc.lock has no record of it)"
                                          for stage in ["download", "prepare", "validate", "train", "evaluate",
                                                        "export", "report"]]
    assert set(STAGES) == {line.split(":")[0] for line in result.stdout.splitlines()}
    assert "Flow run" not in result.stderr and seconds < 30, (seconds, result.stderr[-2000:])
    assert (repo / "params.yaml").read_bytes() == before  # the override was there only while DVC looked


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--stage-timeout", "trian=10"],
     "error: --stage-timeout trian=10: no stage 'trian' in dvc.yaml; did you mean 'train'?"),
    (["run", "--stage-timeout", "train=-5"], "error: --stage-timeout train=-5: the seconds must be a positive number"),
    (["sweep", "SWEEP"], "error: override 'train.epoch' names no key in params.yaml; did you mean 'train.epochs'?"),
    (["run", "--pool", "gpu", "--gate"],  # the pool's run came back ungated, silently
     ("error: --gate and --champion judge a run in this workspace; a --pool run comes back as an experiment: "
     "gate it with `cifar10-pipeline gate --candidate NAME`")),
])
def test_bad_arguments_are_refused_before_prefect_starts(monkeypatch, capsys, tmp_path, argv, message):
    """`--stage-timeout trian=10` was accepted silently; a bad sweep file printed 25 lines of
    Prefect's log before its error."""
    import shutil

    from tests.helpers import REPO

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "sweep.yaml").write_text("space:\n  train.epoch: [1, 2]\n")
    argv = [str(tmp_path / "sweep.yaml") if arg == "SWEEP" else arg for arg in argv]
    monkeypatch.setattr("sys.argv", ["cifar10-pipeline", *argv, "--repo", str(tmp_path)])
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit) as ended:
        cli.main()
    captured = capsys.readouterr()
    assert (ended.value.code, captured.err) == (2, message + "\n"), captured


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_a_command_as_ctrl_c_does(monkeypatch, capsys, signame):
    """SIGTERM ended `run` with 143 and no error line; a closed terminal's SIGHUP likewise."""
    import signal
    import threading
    import time

    def stopped():
        # To the main thread, where Python runs signal handlers: a signal the kernel hands to another
        # thread of this process (pytest's, Prefect's) is only seen at the main thread's next check.
        signal.pthread_kill(threading.main_thread().ident, getattr(signal, signame))
        time.sleep(10)  # the handler interrupts this at once; the test fails if it never does

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for signum in saved:  # as in a terminal: a suite run under nohup starts with SIGHUP ignored
            signal.signal(signum, signal.SIG_DFL)
        code, err = run_main(monkeypatch, capsys, stopped)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert code == 130 and err.strip().splitlines()[-1] == "error: interrupted", err
