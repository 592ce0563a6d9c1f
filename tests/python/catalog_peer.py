#!/usr/bin/env python3
"""A Python gRPC peer for chatcli's catalog: generates stubs from proto/chatcli/v1/chatcli.proto
with grpcio-tools (as peer.py does), then lists the remote plugins and downloads one, checking the
chunk protocol (filename and total_size first, done=false on data, a last empty done=true) and that
the bytes equal the file on disk.

Usage: catalog_peer.py HOST:PORT TOKEN PLUGIN FILE  (exit 0 and "catalog peer: OK" on success)
Setup: python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import TIMEOUT, Mismatch, check, generate_stubs  # noqa: E402


def run(addr, token, plugin, path, pb, rpc):
    import grpc

    channel = grpc.insecure_channel(addr)
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    except grpc.FutureTimeoutError:
        raise Mismatch(f"cannot connect to {addr} within {TIMEOUT}s")
    stub = rpc.ChatCLIServiceStub(channel)
    auth = [("authorization", f"Bearer {token}")]

    listed = stub.ListRemotePlugins(pb.ListRemotePluginsRequest(), metadata=auth, timeout=TIMEOUT)
    names = [p.name for p in listed.plugins]
    check(plugin in names, f"ListRemotePlugins = {names}, missing {plugin}")
    check("@coder" in names, f"ListRemotePlugins = {names}, missing the built-in @coder")

    want = Path(path).read_bytes()
    msgs = list(stub.DownloadPlugin(pb.DownloadPluginRequest(plugin_name=plugin),
                                    metadata=auth, timeout=TIMEOUT))
    check(len(msgs) >= 2, f"DownloadPlugin sent {len(msgs)} messages, want data and done")
    first, last, data = msgs[0], msgs[-1], msgs[:-1]
    check(first.filename == Path(path).name,
          f"first filename = {first.filename!r}, want {Path(path).name!r}")
    check(first.total_size == len(want), f"total_size = {first.total_size}, want {len(want)}")
    check(last.done and not last.chunk, "the last message is not an empty done=true")
    check(all(not m.done for m in data), "a data message has done=true")
    check(all(len(m.chunk) <= 64 * 1024 for m in data), "a chunk is larger than 64 KiB")
    got = b"".join(m.chunk for m in data)
    check(got == want, f"downloaded {len(got)} bytes differ from the {len(want)} on disk")

    try:
        list(stub.DownloadPlugin(pb.DownloadPluginRequest(plugin_name="no-such-plugin"),
                                 metadata=auth, timeout=TIMEOUT))
        raise Mismatch("DownloadPlugin of a missing plugin succeeded")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, f"missing plugin: {e.code()}, want NOT_FOUND")
    channel.close()
    return len(data)


def main():
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    addr, token, plugin, path = sys.argv[1:]
    try:
        with tempfile.TemporaryDirectory(prefix="chatcli-stubs-") as out:
            pb, rpc = generate_stubs(out)
            chunks = run(addr, token, plugin, path, pb, rpc)
    except ModuleNotFoundError as e:
        print(f"catalog peer: FAIL: {e}; install the requirements: "
              "python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt",
              file=sys.stderr)
        return 1
    except Mismatch as e:
        print(f"catalog peer: FAIL: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an RPC error (grpc.RpcError) or anything unexpected
        print(f"catalog peer: FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"catalog peer: OK (ListRemotePlugins, DownloadPlugin in {chunks} chunks) at {addr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
