"""Drives tokenfab's OpenAI-compatible API with the official `openai` package, as an
existing batch client would: upload, create, poll, download output and errors (every
line checked), list and delete; then cancel a running batch and check that its finished
requests keep their results. Run by tests/e2e_openai.rs against real processes; prints
one JSON line with what it saw (batch ids for the gRPC comparison).

Environment: TOKENFAB_OPENAI_URL (http://HOST:PORT/v1), TOKENFAB_TOKEN (a tenant token).
"""

import json
import os
import sys
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ["TOKENFAB_OPENAI_URL"], api_key=os.environ["TOKENFAB_TOKEN"], max_retries=0)
FINAL = {"completed", "failed", "expired", "cancelled"}


def line(i, max_tokens):
    return json.dumps({
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": f"question {i}"}],
                 "max_tokens": max_tokens},
    })


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def wait(batch_id, until, timeout=120):
    deadline = time.time() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if until(b):
            return b
        check(time.time() < deadline, f"{batch_id} stuck in {b.status}: {b}")
        time.sleep(0.3)


# 1. A batch of 40 requests and one malformed line, through to its files.
lines = [line(i, 16) for i in range(40)]
lines.insert(5, "this line is not JSON")
data = ("\n".join(lines) + "\n").encode()
f = client.files.create(file=("questions.jsonl", data), purpose="batch")
check(f.object == "file" and f.purpose == "batch" and f.bytes == len(data), f"uploaded file: {f}")
check(f.filename == "questions.jsonl", f"filename kept: {f}")
check(f.expires_at and f.expires_at > f.created_at, f"batch files expire with the retention: {f}")
got = client.files.retrieve(f.id)
check(got.id == f.id and got.bytes == f.bytes, f"retrieve: {got}")
check(client.files.content(f.id).content == data, "the uploaded content reads back byte for byte")
check(any(x.id == f.id for x in client.files.list(purpose="batch").data), "the file is listed")

batch = client.batches.create(
    input_file_id=f.id,
    endpoint="/v1/chat/completions",
    completion_window="1h",  # any duration, not only 24h
    metadata={"job": "sdk-test"},
)
check(batch.object == "batch" and batch.input_file_id == f.id, f"created: {batch}")
check(batch.metadata == {"job": "sdk-test"}, f"metadata: {batch.metadata}")
check(batch.expires_at - batch.created_at == 3600, f"a 1h window: {batch}")
done = wait(batch.id, lambda b: b.status in FINAL)
check(done.status == "completed", f"completed: {done}")
c = done.request_counts
check((c.total, c.completed, c.failed) == (41, 40, 1), f"counts: {c}")
check(done.usage.output_tokens == 40 * 16 and done.usage.total_tokens > done.usage.output_tokens, f"usage: {done.usage}")
extra = done.model_extra["x_tokenfab"]
check(extra["joules"] > 0 and extra["cost_usd"] > 0 and extra["sla_class"] == "standard", f"x_tokenfab: {extra}")

out = client.files.content(done.output_file_id).text.splitlines()
check(len(out) == 40, f"40 output lines, got {len(out)}")
seen = set()
for text in out:
    r = json.loads(text)
    check(r["error"] is None and r["response"]["status_code"] == 200, f"output line: {r}")
    body = r["response"]["body"]
    check(body["choices"][0]["message"]["content"], f"an answer: {r}")
    check(body["usage"]["completion_tokens"] == 16, f"usage per request: {r}")
    check(r["id"].startswith(done.id + "_req_"), f"request id: {r}")
    seen.add(r["custom_id"])
check(seen == {f"req-{i}" for i in range(40)}, "every request answered once")
err = client.files.content(done.error_file_id).text.splitlines()
check(len(err) == 1, f"one error line: {err}")
e = json.loads(err[0])
check(e["response"] is None and e["error"]["code"] == "invalid_json" and e["line"] == 6, f"error line: {e}")
meta = client.files.retrieve(done.output_file_id)
check(meta.purpose == "batch_output" and meta.bytes == sum(len(x) + 1 for x in out), f"output file: {meta}")

page = client.batches.list(limit=10)
check(page.data[0].id == done.id, "newest batch first")

# 2. Cancel a running batch: finished requests keep their results.
slow = [line(i, 3000) for i in range(24)]
f2 = client.files.create(file=("slow.jsonl", ("\n".join(slow) + "\n").encode()), purpose="batch")
running = client.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
wait(running.id, lambda b: b.request_counts.completed >= 1, timeout=180)
client.batches.cancel(running.id)
cancelled = wait(running.id, lambda b: b.status in FINAL, timeout=180)
c2 = cancelled.request_counts
check(cancelled.status == "cancelled", f"cancelled: {cancelled}")
check(c2.completed >= 1 and c2.completed < 24 and c2.completed + c2.failed == 24, f"partial: {c2}")
kept = client.files.content(cancelled.output_file_id).text.splitlines()
check(len(kept) == c2.completed, f"{len(kept)} partial results kept, {c2.completed} completed")
ended = [json.loads(x) for x in client.files.content(cancelled.error_file_id).text.splitlines()]
check(all(x["error"]["code"] == "batch_cancelled" for x in ended) and len(ended) == c2.failed, f"cancelled ends: {ended[:2]}")

# 3. Errors look like OpenAI's, and deleting a file works.
try:
    client.batches.retrieve("batch_09999999")
    check(False, "an unknown batch is not found")
except Exception as exc:  # openai.NotFoundError
    check(getattr(exc, "status_code", None) == 404, f"404: {exc}")
    check(exc.body and "message" in exc.body, f"an OpenAI error body: {exc.body}")
deleted = client.files.delete(f2.id)
check(deleted.deleted and deleted.id == f2.id, f"deleted: {deleted}")

print(json.dumps({"batch": done.id, "cancelled": cancelled.id, "partial": c2.completed, "file": f.id}))
