"""A failed night reaches someone: a Prefect automation that posts to a webhook when a flow run
of the pipeline fails or crashes.

Made on the Prefect server the runs report to (the workspace's, or $PREFECT_API_URL): a
CustomWebhookNotificationBlock holds the URL, and an automation reacts to the server's own
`prefect.flow-run.Failed` / `prefect.flow-run.Crashed` events, so it fires however the run
ended (an exception, a killed worker marked Crashed) and whoever started it (a worker, the
schedule, `instructflow run`). Setting it again replaces it: one per workspace server.
"""

from __future__ import annotations

from typing import Any

# Never changes a stage's output (instructflow.codeid).
OUTPUT_NEUTRAL = True
NAME = "instructflow-failed-runs"
EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")
SUBJECT = "instructflow: flow run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}: "
    "{{ flow_run.state.message }} {{ flow_run|ui_url }}"
)


def install(url: str, flow_name: str = "finetune") -> dict[str, Any]:
    """Create (or replace) the block and the automation; returns their ids and names."""
    from prefect.automations import Automation, EventTrigger, Posture, SendNotification
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    remove()
    block = CustomWebhookNotificationBlock(
        name="instructflow",
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "text": "{{body}}"},
        # The user names the receiver (often on their own network): not an SSRF risk here.
        allow_private_urls=True,
    )
    block_id = block.save(NAME, overwrite=True)
    automation = Automation(
        name=NAME,
        description=f"POST to a webhook when a {flow_name} flow run fails or crashes",
        trigger=EventTrigger(
            expect=set(EVENTS),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": flow_name},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()
    return {"automation_id": str(automation.id), "block_id": str(block_id), "name": NAME}


def remove() -> bool:
    """Delete the automation and its block; whether there was one."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    found = False
    try:
        Automation.read(name=NAME).delete()
        found = True
    except ValueError:  # none by that name
        pass
    try:
        CustomWebhookNotificationBlock.load(NAME)
    except ValueError:
        return found
    with get_client(sync_client=True) as client:
        client.delete_block_document(client.read_block_document_by_name(NAME, "custom-webhook").id)
    return True


def installed() -> dict[str, Any] | None:
    """The installed automation's name, state and masked receiver, or None."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    try:
        automation = Automation.read(name=NAME)
        url = CustomWebhookNotificationBlock.load(NAME).url
    except ValueError:
        return None
    return {"name": NAME, "enabled": automation.enabled, "webhook": mask(url)}


def mask(url: str) -> str:
    """The URL without its path and query (where webhook services put their secret token)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    hidden = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{hidden}"
