"""Read Seaport's events from NATS JetStream with third-party clients: nats-py pulls from the
stream, the CloudEvents Python SDK parses each message (structured mode, JSON format).

Usage: read_cloudevents.py NATS_URL STREAM SUBJECT_FILTER COUNT
Prints one JSON line per event: id, type, source, subject, correlationid, causationid.
Exits non-zero if a message is not a valid CloudEvent.
"""
import asyncio
import json
import sys

import nats
from cloudevents.core.formats.json import JSONFormat


async def main(url: str, stream: str, subject: str, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(subject, durable="interop_python", stream=stream)
    seen = 0
    while seen < count:
        for msg in await sub.fetch(count - seen, timeout=10):
            content_type = (msg.headers or {}).get("content-type")
            if content_type != "application/cloudevents+json":
                raise SystemExit(f"unexpected content-type {content_type!r}")
            event = JSONFormat().read(None, msg.data)  # validates a CloudEvents 1.0 event
            attrs = event.get_attributes()
            print(json.dumps({
                "id": attrs["id"],
                "type": attrs["type"],
                "source": attrs["source"],
                "specversion": attrs["specversion"],
                "subject": attrs.get("subject"),
                "correlationid": attrs.get("correlationid"),
                "causationid": attrs.get("causationid"),
                "msg_id": (msg.headers or {}).get("Nats-Msg-Id"),
                "data": event.get_data(),
            }))
            await msg.ack()
            seen += 1
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
