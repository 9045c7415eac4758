#!/usr/bin/env python3
"""Writes demo-10k.jsonl: 10,000 OpenAI Batch API chat requests for `tokenfab demo`.

Deterministic (fixed seed). A mix of short and long answers, as an offline batch job
(summaries, classification, translation, extraction) would have:
max_tokens 32 (25%), 128 (25%), 256 (30%), 512 (20%); mean 220 output tokens.

    python3 examples/batches/make_demo_batch.py > examples/batches/demo-10k.jsonl
"""
import json
import random
import sys

N = 10_000
rng = random.Random(20261123)
tasks = [
    ("Summarize this support ticket in two sentences", "summaries"),
    ("Classify the sentiment of this review as positive, negative or mixed", "reviews"),
    ("Translate into French", "translation"),
    ("Extract every date and amount as JSON", "extraction"),
    ("Write a product description for", "copy"),
    ("Answer the customer's question politely", "support"),
]
subjects = ["order 1042 arrived damaged", "the battery lasts two days", "please reset my password",
            "invoice 77 was charged twice", "a red wool scarf", "the meeting moved to Friday 3pm",
            "shipping to Lisbon took 9 days", "the app crashes when I upload a photo",
            "a stainless steel water bottle", "refund of 49.90 EUR requested on 2026-10-02"]
lengths = [32] * 25 + [128] * 25 + [256] * 30 + [512] * 20

for i in range(N):
    task, kind = rng.choice(tasks)
    subject = rng.choice(subjects)
    extra = " ".join(rng.choice(subjects) for _ in range(rng.randint(0, 4)))
    body = {
        "model": "llama-3.1-8b",
        "messages": [
            {"role": "system", "content": f"You are a careful assistant for {kind}."},
            {"role": "user", "content": f"{task}: {subject}. {extra}".strip()},
        ],
        "max_tokens": rng.choice(lengths),
    }
    line = {"custom_id": f"demo-{i:05d}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
