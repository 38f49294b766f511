#!/usr/bin/env python3
"""A faasmoe client in Python (nats-py): streams one JSON generate request.

    python3 controller/tests/python_client.py <nats_url> <tenant> [<user> <password> [input_ids]]

With a user (e.g. `tenant-alice`), it connects with that user's credentials and creates its
inboxes under `_INBOX.<user>` (nats-py's `inbox_prefix`), the only inboxes the project's
`nats.conf` lets the user subscribe to. With `input_ids` (e.g. `1,2,3`) it sends token ids
instead of the prompt (a checkpoint without a tokenizer).

Subscribes a fresh inbox, publishes `{"prompt": "Hello", "max_tokens": 8, "temperature": 0,
"stream": true}` on `faasmoe.v1.generate.<tenant>` with that inbox as the reply subject,
prints every chunk, and exits 0 after the `done` message when it carries 8 token ids whose
concatenated chunks match; exits 1 on an `error` message, a mismatch or a timeout.
Needs nats-py (`scripts/install-test-deps`, then PYTHONPATH=.tools/py).
"""

import asyncio
import json
import sys

import nats
import nats.errors

TIMEOUT_S = 60.0
MAX_TOKENS = 8


async def main(url: str, tenant: str, user=None, password=None, input_ids=None) -> int:
    if user is None:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    else:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0, user=user, password=password,
                                inbox_prefix=f"_INBOX.{user}".encode())
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        body = {"prompt": "Hello", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
        if input_ids:
            del body["prompt"]
            body["input_ids"] = [int(i) for i in input_ids.split(",")]
        await nc.publish(f"faasmoe.v1.generate.{tenant}", json.dumps(body).encode(), reply=inbox)
        await nc.flush()
        text, ids = "", []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT_S
        while True:
            left = deadline - loop.time()
            if left <= 0:
                print("timed out waiting for the stream", file=sys.stderr)
                return 1
            msg = await sub.next_msg(timeout=left)
            m = json.loads(msg.data)
            kind = m.get("type")
            if kind == "chunk":
                print(f"chunk {m['index']}: {m['text']!r} {m['token_ids']}", flush=True)
                text += m["text"]
                ids += m["token_ids"]
            elif kind == "done":
                print(f"done: {m['text']!r} {m['token_ids']} finish={m['finish_reason']}", flush=True)
                if len(m["token_ids"]) != MAX_TOKENS:
                    print(f"expected {MAX_TOKENS} token ids, got {len(m['token_ids'])}", file=sys.stderr)
                    return 1
                if ids != m["token_ids"] or text != m["text"]:
                    print(f"chunks {text!r} {ids} differ from done", file=sys.stderr)
                    return 1
                return 0
            else:
                print(f"unexpected message: {m}", file=sys.stderr)
                return 1
    except (asyncio.TimeoutError, nats.errors.TimeoutError):
        print("timed out waiting for the stream", file=sys.stderr)
        return 1
    finally:
        await nc.close()


if __name__ == "__main__":
    if len(sys.argv) not in (3, 5, 6):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(*sys.argv[1:])))
