#!/usr/bin/env python3
"""A Python grpcio client that shows StreamPrompt is streamed, not buffered: it prints the first
message as soon as it arrives, then waits for the driving test to say "go" (after the test let the
fake upstream continue) before it reads the rest.

Usage: stream_peer.py HOST:PORT PROVIDER
Protocol on stdout, one line each, flushed:
  FIRST <chunk of the first message>
  (then reads one line from stdin, which must be "go")
  REST <the chunks of every later message, concatenated>
  DONE <provider> <model>            (of the final done=true message)
Exit 0 on success; non-zero with the mismatch on stderr otherwise.
Setup: python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt
"""

import sys
import tempfile

from peer import Mismatch, check, generate_stubs

TIMEOUT = 120  # seconds for the whole call; only there so a broken server fails instead of hanging
PROMPT = "stream to a python peer"


def run(addr, provider, pb, rpc):
    import grpc

    channel = grpc.insecure_channel(addr)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
    except grpc.FutureTimeoutError:
        raise Mismatch(f"cannot connect to {addr} within 30s")
    stub = rpc.ChatCLIServiceStub(channel)
    responses = stub.StreamPrompt(
        pb.StreamPromptRequest(prompt=PROMPT, provider=provider), timeout=TIMEOUT
    )
    first = next(responses, None)
    check(first is not None, "StreamPrompt ended before its first message")
    check(not first.done, "the first StreamPrompt message is already done")
    check(first.chunk != "", "the first StreamPrompt message has an empty chunk")
    print(f"FIRST {first.chunk}", flush=True)

    go = sys.stdin.readline().strip()
    check(go == "go", f"expected 'go' on stdin, got {go!r}")

    rest = list(responses)
    check(rest, "StreamPrompt sent nothing after the first message")
    last = rest[-1]
    check(last.done, "the last StreamPrompt message is not done")
    early = [i for i, r in enumerate(rest[:-1]) if r.done]
    check(not early, f"StreamPrompt messages {early} after the first are done before the last")
    print("REST " + "".join(r.chunk for r in rest), flush=True)
    print(f"DONE {last.provider} {last.model}", flush=True)
    channel.close()


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    addr, provider = sys.argv[1], sys.argv[2]
    try:
        with tempfile.TemporaryDirectory(prefix="chatcli-stubs-") as out:
            pb, rpc = generate_stubs(out)
            run(addr, provider, pb, rpc)
    except ModuleNotFoundError as e:
        print(f"stream_peer: FAIL: {e}; install the requirements: "
              "python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt",
              file=sys.stderr)
        return 1
    except Mismatch as e:
        print(f"stream_peer: FAIL: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an RPC error (grpc.RpcError) or anything unexpected
        print(f"stream_peer: FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
