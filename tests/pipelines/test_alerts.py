"""Alerts through Prefect's automations, end to end: a real server, the real flow, a webhook receiver."""

from __future__ import annotations

import json
import time

import pytest

from pipelines.alerts import AUTOMATION_NAME, BLOCK_NAME
from tests.helpers import api, cli, copy_repo, webhook_receiver


@pytest.mark.e2e
def test_a_failed_run_reaches_the_webhook_with_its_stage_s_line(history_repo, prefect_env, prefect_api, tmp_path):
    source, _ = history_repo
    repo = copy_repo(source, tmp_path / "project")
    # A commit that breaks the stage, which fails as the project's stages do: one `error:` line, its exit code.
    (repo / "scorer.py").write_text('import sys\nprint("error: the data went missing", file=sys.stderr)\nsys.exit(3)\n')
    with webhook_receiver() as (url, received):
        try:
            for _ in range(2):  # set up twice: still one automation
                done = cli(prefect_env, "alerts", "--webhook", url)
                assert done.returncode == 0, done.stderr
            assert f"sent to {url.split('/')[2]} (" in done.stdout and url not in done.stdout

            automations = [a for a in api(prefect_api, "POST", "/automations/filter", {}) if a["name"] == AUTOMATION_NAME]
            assert len(automations) == 1 and automations[0]["enabled"]
            blocks = api(prefect_api, "POST", "/block_documents/filter",
                         {"block_documents": {"name": {"any_": [BLOCK_NAME]}}})
            assert len(blocks) == 1 and url not in json.dumps(blocks)  # the URL is the block's secret

            run = cli(prefect_env, "run", "--repo", str(repo))
            assert run.returncode == 3 and "evaluate" in run.stderr, run.stderr[-2000:]
            deadline = time.monotonic() + 90
            while not received and time.monotonic() < deadline:
                time.sleep(1)
            assert len(received) == 1, received
            alert = received[0]
            assert alert["subject"].startswith("cifar10-pipeline: flow run ") and alert["subject"].endswith(" is Failed")
            assert "evaluate" in alert["body"] and "the data went missing" in alert["body"], alert["body"]
            assert alert["text"] == f"{alert['subject']}\n{alert['body']}"
        finally:
            for automation in api(prefect_api, "POST", "/automations/filter", {}):
                if automation["name"] == AUTOMATION_NAME:  # the server is shared with later tests
                    api(prefect_api, "DELETE", f"/automations/{automation['id']}")

    wrong = cli(prefect_env, "alerts", "--webhook", "hooks.slack.com/xyz")
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "not an http(s) URL" in wrong.stderr
