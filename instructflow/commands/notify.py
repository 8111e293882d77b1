"""`instructflow notify --webhook URL`: a failed or crashed pipeline run posts to a webhook."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "notify",
        help="post to a webhook when a pipeline run fails or crashes (a Prefect automation)",
        description="Creates a Prefect automation on the workspace's Prefect server (or "
        "$PREFECT_API_URL's) that POSTs {subject, text} as JSON to a webhook when a finetune "
        "flow run ends Failed or Crashed, whoever started it (worker, schedule, run). Without "
        "an option: shows what is installed.",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--webhook", metavar="URL", help="the receiver (replaces an earlier one)")
    what.add_argument("--remove", action="store_true", help="delete the automation")
    p.add_argument(
        "--flow", default="finetune", help="the flow whose runs are watched (default: finetune)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from instructflow.cli import make_console, use_workspace_prefect_server

    if not use_workspace_prefect_server(make_console()):
        return 1
    from instructflow import notify

    if args.webhook:
        if not args.webhook.startswith(("http://", "https://")):
            print(f"error: --webhook {args.webhook!r}: expected an http(s) URL", file=sys.stderr)
            return 2
        made = notify.install(args.webhook, args.flow)
        print(
            f"automation {made['name']} ({made['automation_id']}): a {args.flow} run that "
            f"fails or crashes posts to {notify.mask(args.webhook)}"
        )
        return 0
    if args.remove:
        print("removed" if notify.remove() else "no notification was installed")
        return 0
    info = notify.installed()
    if info is None:
        print("no notification installed (`instructflow notify --webhook URL`)")
        return 1
    state = "enabled" if info["enabled"] else "disabled"
    print(f"automation {info['name']} ({state}) posts to {info['webhook']}")
    return 0
