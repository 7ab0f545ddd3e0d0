"""Alerts with Prefect's own means: a Custom Webhook notification block and an automation that
sends to it when a run of the pipeline's flows fails, crashes or is late (a scheduled run no
worker started in time). A gate that fails fails its run, so its verdict arrives the same way.

`cifar10-pipeline alerts --webhook URL` sets both up and can be run again: the block is
overwritten and the automation replaced, never doubled. The payload is JSON with `text` (what
Slack and Teams webhooks show), `subject` and `body`, so any receiver can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_NAME = "cifar10-alerts"
AUTOMATION_NAME = "cifar10-pipeline: run failed, crashed or late"
EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.Late")
SUBJECT = "{{ flow.name }}: flow run {{ flow_run.name }} is {{ flow_run.state.name }}"
# Jinja, filled in by Prefect's automation service: the state's message names the failing stage
# and its error line (or the gate's verdict).
BODY = ("Flow run {{ flow_run.name }} of {{ flow.name }}"
        "{% if deployment %} (deployment {{ deployment.name }}){% endif %} is {{ flow_run.state.name }}"
        "{% if flow_run.state.message %}: {{ flow_run.state.message }}{% endif %}"
        "{% if flow_run.state.name == 'Late' %}: scheduled for {{ flow_run.expected_start_time }}, "
        "no worker has started it{% endif %}\n{{ flow_run|ui_url }}")


@dataclass(frozen=True)
class AlertSetup:
    block: str
    automation: str
    flows: tuple[str, ...]

    def describe(self, url: str) -> str:
        host = url.split("/")[2] if url.count("/") >= 2 else url
        return (f"alerts: runs of {', '.join(self.flows)} that fail, crash or run late are sent to {host} "
                f"(notification block '{self.block}', automation '{self.automation}')")


def watched_flows() -> tuple[str, ...]:
    """The flows a schedule or a work pool runs: the pipeline here, a whole run on a worker, and the
    scheduled retrain."""
    from pipelines.flow import FLOW_NAME
    from pipelines.pool import FLOW_NAME as POOL_FLOW_NAME
    from pipelines.retrain import RETRAIN_FLOW

    return FLOW_NAME, POOL_FLOW_NAME, RETRAIN_FLOW


def set_up_alerts(webhook_url: str) -> AlertSetup:
    """Save the webhook block and (re)create the automation on the server PREFECT_API_URL names."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    # A chat webhook's URL is its password: kept as the block's secret, hidden in the UI and the API.
    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME, url="{{webhook_url}}", secrets={"webhook_url": webhook_url},
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"})
    block_id = block.save(BLOCK_NAME, overwrite=True)
    flows = watched_flows()
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(AUTOMATION_NAME):
            client.delete_automation(old.id)
    Automation(
        name=AUTOMATION_NAME,
        description="Set up by `cifar10-pipeline alerts`; running it again replaces this automation.",
        trigger=EventTrigger(
            expect=set(EVENTS), posture=Posture.Reactive, threshold=1,
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(flows)}),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()
    return AlertSetup(BLOCK_NAME, AUTOMATION_NAME, flows)
