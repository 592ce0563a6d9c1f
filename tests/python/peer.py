#!/usr/bin/env python3
"""A Python gRPC peer for chatcli: generates stubs from proto/chatcli/v1/chatcli.proto with
grpcio-tools, then checks Health, a v2 SaveSession/LoadSession round trip and a StreamPrompt
against a running server.

Usage: peer.py HOST:PORT  (exit 0 and "peer: OK" on success; non-zero with the mismatch otherwise)
Setup: python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt
"""

import importlib
import sys
import tempfile
import uuid
from pathlib import Path

TIMEOUT = 15  # seconds per call; only there so a broken server fails instead of hanging
REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO = PROTO_ROOT / "chatcli" / "v1" / "chatcli.proto"


class Mismatch(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Mismatch(what)


def generate_stubs(out_dir):
    from grpc_tools import protoc

    try:
        from importlib.resources import files

        well_known = str(files("grpc_tools") / "_proto")
    except Exception:  # older grpc_tools layouts: the include dir is optional here
        well_known = None
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO),
    ]
    if well_known:
        args.insert(2, f"-I{well_known}")
    rc = protoc.main(args)
    if rc != 0:
        raise Mismatch(f"grpc_tools.protoc failed with exit code {rc} on {PROTO}")
    sys.path.insert(0, out_dir)
    pb = importlib.import_module("chatcli.v1.chatcli_pb2")
    rpc = importlib.import_module("chatcli.v1.chatcli_pb2_grpc")
    return pb, rpc


def msg(pb, role, content, meta=None):
    m = pb.ChatMessage(role=role, content=content)
    if meta is not None:
        m.meta.CopyFrom(meta)
    return m


def same_messages(pb, label, got, want):
    check(len(got) == len(want), f"{label}: {len(got)} messages, want {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        where = f"{label}[{i}]"
        check(g.role == w.role, f"{where}.role = {g.role!r}, want {w.role!r}")
        check(g.content == w.content, f"{where}.content = {g.content!r}, want {w.content!r}")
        check(
            g.HasField("meta") == w.HasField("meta"),
            f"{where}.meta present = {g.HasField('meta')}, want {w.HasField('meta')}",
        )
        if w.HasField("meta"):
            for field in ("is_summary", "summary_of", "mode"):
                gv, wv = getattr(g.meta, field), getattr(w.meta, field)
                check(gv == wv, f"{where}.meta.{field} = {gv!r}, want {wv!r}")


def run(addr, pb, rpc):
    import grpc

    channel = grpc.insecure_channel(addr)
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    except grpc.FutureTimeoutError:
        raise Mismatch(f"cannot connect to {addr} within {TIMEOUT}s")
    stub = rpc.ChatCLIServiceStub(channel)

    health = stub.Health(pb.HealthRequest(), timeout=TIMEOUT)
    check(
        health.status == pb.HealthResponse.SERVING,
        f"Health.status = {pb.HealthResponse.Status.Name(health.status)}, want SERVING",
    )
    check(health.version != "", "Health.version is empty")

    name = f"py-peer-{uuid.uuid4().hex[:8]}"
    summary = pb.MessageMeta(is_summary=True, summary_of=3, mode="agent")
    data = pb.SessionDataV2(
        version=2,
        chat_history=[msg(pb, "user", "hello from python"), msg(pb, "assistant", "hi")],
        agent_history=[
            msg(pb, "user", "list the pods"),
            msg(pb, "assistant", "summary of three turns", summary),
        ],
        coder_history=[msg(pb, "user", "fix it")],
        shared_memory=[msg(pb, "system", "remember: prod-eu")],
    )
    saved = stub.SaveSession(pb.SaveSessionRequest(name=name, session_data=data), timeout=TIMEOUT)
    check(saved.success, "SaveSession.success is false")

    loaded = stub.LoadSession(pb.LoadSessionRequest(name=name), timeout=TIMEOUT)
    check(loaded.HasField("session_data"), "LoadSession.session_data is missing")
    got = loaded.session_data
    check(got.version == 2, f"session_data.version = {got.version}, want 2")
    for field in ("chat_history", "agent_history", "coder_history", "shared_memory"):
        same_messages(pb, f"session_data.{field}", getattr(got, field), getattr(data, field))
    same_messages(pb, "messages", loaded.messages, data.chat_history)

    listed = stub.ListSessions(pb.ListSessionsRequest(), timeout=TIMEOUT)
    check(name in listed.sessions, f"ListSessions = {list(listed.sessions)}, missing {name}")

    prompt = "streamed back to a python peer word by word"
    responses = list(stub.StreamPrompt(pb.StreamPromptRequest(prompt=prompt), timeout=TIMEOUT))
    check(responses, "StreamPrompt returned no messages")
    chunks = [r.chunk for r in responses if r.chunk]
    check(len(chunks) >= 2, f"StreamPrompt sent {len(chunks)} non-empty chunks, want >= 2")
    joined = "".join(r.chunk for r in responses)
    check(joined == prompt, f"StreamPrompt chunks join to {joined!r}, want {prompt!r}")
    check(responses[-1].done, "the last StreamPrompt message is not done")
    early = [i for i, r in enumerate(responses[:-1]) if r.done]
    check(not early, f"StreamPrompt messages {early} are done before the last")

    deleted = stub.DeleteSession(pb.DeleteSessionRequest(name=name), timeout=TIMEOUT)
    check(deleted.success, "DeleteSession.success is false")
    channel.close()
    return len(chunks)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    addr = sys.argv[1]
    try:
        with tempfile.TemporaryDirectory(prefix="chatcli-stubs-") as out:
            pb, rpc = generate_stubs(out)
            chunks = run(addr, pb, rpc)
    except ModuleNotFoundError as e:
        print(f"peer: FAIL: {e}; install the requirements: "
              "python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt",
              file=sys.stderr)
        return 1
    except Mismatch as e:
        print(f"peer: FAIL: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an RPC error (grpc.RpcError) or anything unexpected
        print(f"peer: FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"peer: OK (Health, SaveSession/LoadSession v2, StreamPrompt in {chunks} chunks) at {addr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
