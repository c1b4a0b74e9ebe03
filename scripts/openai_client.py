#!/usr/bin/env python3
"""Talk to `bitsvf serve` with the official `openai` Python client (pip install openai).

Usage: scripts/openai_client.py [BASE_URL]   (default http://127.0.0.1:8080/v1)

Lists the models, then for the base, every expert and `bitsvf/auto` asks a completion and a
chat completion, plain and streamed, and prints which adapter answered. Exits non-zero if any
call fails or a streamed answer differs from the plain one (greedy decoding)."""
import os
import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1"
client = OpenAI(base_url=base_url, api_key=os.environ.get("BITSVF_API_KEY", "none"))

models = [m.id for m in client.models.list().data]
print("models:", ", ".join(models))
prompt = "count a in banana?"
failures = 0
for model in models:
    c = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    adapter = (c.model_extra or {}).get("bitsvf", {}).get("adapter")
    text = c.choices[0].text
    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        if chunk.choices
    )
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
    )
    chat_streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        if chunk.choices
    )
    ok = text == streamed and chat.choices[0].message.content == chat_streamed
    failures += not ok
    print(
        f"{model:>20}: adapter {adapter!s:>10}  completion {text!r:<14} chat "
        f"{chat.choices[0].message.content!r:<14} usage {c.usage.total_tokens} tokens"
        + ("" if ok else "  STREAMED ANSWER DIFFERS")
    )
sys.exit(1 if failures else 0)
