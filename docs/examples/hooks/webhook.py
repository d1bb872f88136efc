"""A JSON webhook for each delivered message (docs/filters.md, example 3).

After the 250, the "delivered" stage posts who got what to an HTTP
endpoint (a ticket system, a chat channel, a billing counter).  It runs
after the client has its answer, so a slow endpoint never delays mail;
[filters] hook_timeout bounds it, and a failure is only logged.

    [filters]
    hooks = ["webhook:Webhook"]

Environment: WEBHOOK_URL, e.g. "http://127.0.0.1:8080/mail".
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request

from postoffice.filters.interface import DeliveryReport, SessionFacts


class Webhook:
    def __init__(self) -> None:
        self.url = os.environ["WEBHOOK_URL"]

    async def delivered(self, facts: SessionFacts, report: DeliveryReport) -> None:
        payload = {
            "queue_id": report.queue_id,
            "sender": report.sender,
            "local": list(report.local),
            "remote": list(report.remote),
            "folder": report.folder,
            "size": report.size,
            "discarded": report.discarded,
            "client": facts.client_address,
        }
        await asyncio.to_thread(self._post, json.dumps(payload).encode())

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
