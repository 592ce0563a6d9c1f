#!/usr/bin/env python3
"""A Python gRPC peer for chatcli's conversation hub: generates stubs from our proto (as peer.py
does), then resolves the caller's active conversation, follows it with SubscribeConversation while
appending events (one of them retried with the same client_msg_id), and checks that the
subscriber saw every event once, in seq order, and that ReadConversation agrees.

Usage: hub_peer.py HOST:PORT  (exit 0 and "hub peer: OK conv=<id>" on success)
Setup: python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt
"""

import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import Mismatch, check, generate_stubs  # noqa: E402

TIMEOUT = 15  # seconds per call; only there so a broken server fails instead of hanging
EVENTS = [
    ("user", "hello from python"),
    ("assistant", "hi, python"),
    ("user", "how are seqs numbered?"),
    ("assistant", "1, 2, 3, with no gaps"),
    ("tool_summary", "nothing to summarise"),
    ("checkpoint", "done"),
]


def run(addr, pb, rpc):
    import grpc

    channel = grpc.insecure_channel(addr)
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    except grpc.FutureTimeoutError:
        raise Mismatch(f"cannot connect to {addr} within {TIMEOUT}s")
    stub = rpc.ChatCLIServiceStub(channel)

    resolved = stub.ResolveActiveConversation(
        pb.ResolveActiveConversationRequest(), timeout=TIMEOUT
    )
    conv = resolved.conv_id
    check(conv != "", "ResolveActiveConversation.conv_id is empty")
    check(
        resolved.principal == "system",
        f"ResolveActiveConversation.principal = {resolved.principal!r}, want 'system' (no auth)",
    )

    seen = []
    failure = []
    subscription = stub.SubscribeConversation(
        pb.SubscribeConversationRequest(conv_id=conv, since_seq=0), timeout=60
    )

    def follow():
        try:
            for event in subscription:
                seen.append(event)
                if len(seen) == len(EVENTS):
                    subscription.cancel()
                    return
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                failure.append(e)

    follower = threading.Thread(target=follow)
    follower.start()

    acked = []
    for i, (role, content) in enumerate(EVENTS):
        req = pb.AppendEventRequest(
            conv_id=conv, channel="python", role=role, content=content, client_msg_id=f"py-{i}"
        )
        event = stub.AppendEvent(req, timeout=TIMEOUT).event
        acked.append(event.seq)
        if i == 1:
            retry = stub.AppendEvent(req, timeout=TIMEOUT).event
            check(
                retry.seq == event.seq,
                f"a retried client_msg_id got seq {retry.seq}, want {event.seq}",
            )
    check(acked == list(range(1, len(EVENTS) + 1)), f"AppendEvent seqs = {acked}")

    follower.join(timeout=30)
    check(not follower.is_alive(), f"the subscriber saw {len(seen)} events, want {len(EVENTS)}")
    check(not failure, f"the subscription failed: {failure}")
    got = [(e.seq, e.role, e.content, e.channel) for e in seen]
    want = [(i + 1, r, c, "python") for i, (r, c) in enumerate(EVENTS)]
    check(got == want, f"subscribed events = {got}, want {want}")
    check(all(e.ts > 0 for e in seen), "an event has no ts")
    check(all(e.principal == "system" for e in seen), "an event has another principal")

    tail = stub.ReadConversation(
        pb.ReadConversationRequest(conv_id=conv, since_seq=3, limit=2), timeout=TIMEOUT
    ).events
    check([e.seq for e in tail] == [4, 5], f"ReadConversation(since 3, limit 2) = {[e.seq for e in tail]}")

    try:
        stub.ReadConversation(pb.ReadConversationRequest(conv_id="no-such-conv"), timeout=TIMEOUT)
        raise Mismatch("ReadConversation of an unknown conv_id succeeded")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, f"unknown conv_id: {e.code()}, want NOT_FOUND")
    channel.close()
    return conv


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    addr = sys.argv[1]
    try:
        with tempfile.TemporaryDirectory(prefix="chatcli-stubs-") as out:
            pb, rpc = generate_stubs(out)
            conv = run(addr, pb, rpc)
    except ModuleNotFoundError as e:
        print(f"hub peer: FAIL: {e}; install the requirements: "
              "python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt",
              file=sys.stderr)
        return 1
    except Mismatch as e:
        print(f"hub peer: FAIL: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an RPC error (grpc.RpcError) or anything unexpected
        print(f"hub peer: FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"hub peer: OK conv={conv} ({len(EVENTS)} events appended and followed) at {addr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
