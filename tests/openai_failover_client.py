"""An OpenAI SDK client that follows the serving replica of a replicated control plane
(run by tests/e2e_raft_failover.rs against real processes).

Given every replica's OpenAI URL (TOKENFAB_OPENAI_URLS, comma-separated), its HTTP
transport sends each call to the replica that answered last and, when that one refuses the
connection or answers 503 (a replica that does not serve, or a leader that lost its lease),
tries the next: the official `openai` package works unchanged on top of it. The script
uploads a file, creates a batch, prints `created <id>`, and waits for a line on stdin (the
test kills the leader meanwhile); then it follows the batch to completion through whichever
replica serves, downloads the output, checks one result per request, and prints one JSON
line with what it saw.

Environment: TOKENFAB_OPENAI_URLS, TOKENFAB_TOKEN (a tenant token).
"""

import json
import os
import sys
import time

# The HTTP client the `openai` package is built on (httpx2, httpx's API).
import httpx2 as httpx
from openai import OpenAI


class FollowTheLeader(httpx.BaseTransport):
    """Sends each request to the current replica, moving on while none serves."""

    def __init__(self, urls, within=60.0):
        self.urls = [httpx.URL(u) for u in urls]
        self.current = 0
        self.within = within
        self.moves = 0
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request):
        deadline = time.monotonic() + self.within
        while True:
            base = self.urls[self.current]
            request.url = request.url.copy_with(scheme=base.scheme, host=base.host, port=base.port)
            request.headers["Host"] = base.netloc.decode()
            try:
                response = self.inner.handle_request(request)
                if response.status_code != 503:
                    return response
                response.read()
                response.close()
                failure = httpx.ConnectError(f"{base} answered 503")
            except httpx.TransportError as e:
                failure = e
            if time.monotonic() > deadline:
                raise failure
            self.current = (self.current + 1) % len(self.urls)
            self.moves += 1
            time.sleep(0.05)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


urls = os.environ["TOKENFAB_OPENAI_URLS"].split(",")
transport = FollowTheLeader(urls)
client = OpenAI(base_url=urls[0], api_key=os.environ["TOKENFAB_TOKEN"], max_retries=0,
                http_client=httpx.Client(transport=transport, timeout=30.0))

N = 60
lines = [json.dumps({
    "custom_id": f"req-{i}",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 16},
}) for i in range(N)]
uploaded = client.files.create(file=("input.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
print(f"created {batch.id}", flush=True)
sys.stdin.readline()

deadline = time.monotonic() + 120
while True:
    b = client.batches.retrieve(batch.id)
    if b.status in {"completed", "failed", "expired", "cancelled"}:
        break
    check(time.monotonic() < deadline, f"batch {batch.id} is still {b.status} after 120 s")
    time.sleep(0.2)
check(b.status == "completed", f"batch {batch.id} ended {b.status}")
out = client.files.content(b.output_file_id).text
ids = [json.loads(line)["custom_id"] for line in out.splitlines() if line.strip()]
check(sorted(ids) == sorted(f"req-{i}" for i in range(N)), f"results {sorted(ids)[:5]}... are not one per request")
print(json.dumps({"batch": batch.id, "results": len(ids), "moves": transport.moves}))
