#!/usr/bin/env python3
"""The real `openai` Python SDK against chatcli's OpenAI-compatible API: a non-streaming completion,
a streaming completion read in two halves (to show chunks arrive before the upstream finishes),
models.list(), and a wrong key surfacing as openai.AuthenticationError.

Usage: openai_peer.py BASE_URL API_KEY     (BASE_URL like http://127.0.0.1:PORT/v1)
The server must answer with a provider `fake` (model `gpt-fake`) whose upstream replies, in order:
  1. "Hello from the fake" (4 words, usage 3 prompt tokens), unstreamed;
  2. streamed: "Hel", then waits until released, then "lo", " there".
Protocol on stdout, one line each, flushed:
  FIRST <content of the first chunk>
  (then reads one line from stdin; the driving test sends it after releasing the upstream)
  peer: OK
Exit 0 on success; non-zero with the mismatch on stderr otherwise.
Setup: python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt
"""

import sys

import openai

MODEL = "fake/gpt-fake"
TIMEOUT = 60  # seconds per call; only there so a broken server fails instead of hanging


class Mismatch(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Mismatch(what)


def run(base_url, api_key):
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=TIMEOUT)

    r = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say hello"},
        ],
        user="python-peer",
        seed=7,
    )
    check(r.object == "chat.completion", f"object is {r.object!r}")
    check(len(r.choices) == 1, f"{len(r.choices)} choices")
    content = r.choices[0].message.content
    check(content == "Hello from the fake", f"content is {content!r}")
    check(r.choices[0].message.role == "assistant", f"role is {r.choices[0].message.role!r}")
    check(r.choices[0].finish_reason == "stop", f"finish_reason is {r.choices[0].finish_reason!r}")
    check(r.model == MODEL, f"model is {r.model!r}")
    check(r.usage is not None, "no usage")
    check(
        (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 4, 7),
        f"usage is {r.usage}",
    )

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = iter(stream)
    first = next(chunks, None)
    check(first is not None, "the stream ended before its first chunk")
    check(first.object == "chat.completion.chunk", f"object is {first.object!r}")
    check(first.choices and first.choices[0].delta.content, f"first chunk has no content: {first}")
    print(f"FIRST {first.choices[0].delta.content}", flush=True)
    sys.stdin.readline()
    rest = list(chunks)
    text = first.choices[0].delta.content + "".join(
        c.choices[0].delta.content or "" for c in rest if c.choices
    )
    check(text == "Hello there", f"streamed text is {text!r}")
    finishes = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    check(finishes == ["stop"], f"finish reasons {finishes}")
    check(rest and not rest[-1].choices, "the last chunk is not the usage chunk")
    check(rest[-1].usage is not None and rest[-1].usage.prompt_tokens == 3, f"usage {rest[-1].usage}")

    ids = [m.id for m in client.models.list().data]
    check("fake/gpt-fake" in ids, f"model ids {ids}")

    bad = openai.OpenAI(base_url=base_url, api_key="not-the-key", max_retries=0, timeout=TIMEOUT)
    try:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"status {e.status_code}")
    else:
        raise Mismatch("a wrong key did not raise AuthenticationError")


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        run(sys.argv[1], sys.argv[2])
    except Mismatch as e:
        print(f"mismatch: {e}", file=sys.stderr)
        return 1
    print("peer: OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
