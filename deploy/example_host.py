"""A minimal host for aibridged: push state over the control plane, then consume usage records.

On every (re)connect it pushes one provider and one client API key (the daemon keeps pushed state
in memory only, so a restarted daemon needs it again), prints GetStatus, then streams usage from
the cursor saved in a JSON state file, printing each record as one JSON line on stdout and
acknowledging after each batch. Diagnostics go to stderr. Ctrl-C exits cleanly.

    python deploy/example_host.py --token "$TOKEN" --provider-key "$ANTHROPIC_API_KEY" \\
        --client-key my-client-key --actor-id u-1 --username alice

Then: ``curl localhost:8080/anthropic/v1/messages -H 'x-api-key: my-client-key' ...``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from control.v1 import control_pb2 as pb
from control.v1 import control_pb2_grpc

Metadata = tuple[tuple[str, str], ...]
MAX_BACKOFF = 30.0


def log(message: str) -> None:
    print(f"[host] {message}", file=sys.stderr, flush=True)


def load_cursor(path: Path) -> tuple[str, int]:
    """``(epoch, last acked seq)`` from the state file; ``("", 0)`` when there is none."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return str(data.get("epoch", "")), int(data.get("acked_through", 0))
    except FileNotFoundError:
        return "", 0


def save_cursor(path: Path, epoch: str, acked_through: int) -> None:
    """Write the cursor atomically (write a temp file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"epoch": epoch, "acked_through": acked_through}) + "\n")
    tmp.replace(path)


def push_state(
    stub: control_pb2_grpc.ControlServiceStub, args: argparse.Namespace, md: Metadata
) -> None:
    """Push the provider and the client key (full state), versioned by the current unix time."""
    version = int(time.time())
    provider = pb.Provider(
        name="anthropic",
        type=pb.PROVIDER_TYPE_ANTHROPIC,
        base_url=args.provider_url,
        api_key=args.provider_key,
        max_retries=1,
    )
    resp = stub.PutProviders(
        pb.PutProvidersRequest(config_version=version, providers=[provider], allow_byok=False),
        metadata=md,
        timeout=10,
    )
    log(f"providers applied, version {resp.applied_version}")
    key = pb.ApiKey(
        key_id="example-key",
        key_sha256=hashlib.sha256(args.client_key.encode()).hexdigest(),
        actor=pb.Actor(id=args.actor_id, username=args.username),
    )
    keys = stub.PutApiKeys(
        pb.PutApiKeysRequest(config_version=version, api_keys=[key]), metadata=md, timeout=10
    )
    log(f"api keys applied, version {keys.applied_version}")
    status = stub.GetStatus(pb.GetStatusRequest(), metadata=md, timeout=10)
    log("status: " + json.dumps(MessageToDict(status, preserving_proto_field_name=True)))


def consume(stub: control_pb2_grpc.ControlServiceStub, state: Path, md: Metadata) -> None:
    """Stream usage from the saved cursor until the stream ends; ack and save after each batch."""
    epoch, acked = load_cursor(state)
    log(f"streaming usage after seq {acked} (epoch {epoch or '-'})")
    request = pb.StreamUsageRequest(resume_after=acked, epoch=epoch, max_batch=500)
    for batch in stub.StreamUsage(request, metadata=md):
        if batch.epoch != epoch:
            # A new spool: the old cursor is void; the daemon restarts from its oldest record.
            log(f"spool epoch changed ({epoch or '-'} -> {batch.epoch}): cursor reset")
            epoch, acked = batch.epoch, 0
            save_cursor(state, epoch, acked)
        fresh = [r for r in batch.records if r.seq > acked]
        if not fresh:
            continue  # heartbeat, or records already stored (at-least-once delivery)
        for record in fresh:
            print(json.dumps(MessageToDict(record, preserving_proto_field_name=True)), flush=True)
        # Store first (here: stdout), then ack, then save the cursor.
        last = fresh[-1].seq
        stub.AckUsage(pb.AckUsageRequest(epoch=epoch, acked_through=last), metadata=md, timeout=10)
        acked = last
        save_cursor(state, epoch, acked)


def run(args: argparse.Namespace) -> None:
    md: Metadata = (("authorization", f"Bearer {args.token}"),)
    backoff = 1.0
    while True:
        with grpc.insecure_channel(args.target) as channel:
            stub = control_pb2_grpc.ControlServiceStub(channel)
            started = time.monotonic()
            try:
                push_state(stub, args, md)
                consume(stub, args.state, md)
                log("usage stream ended (daemon shutting down?)")
            except grpc.RpcError as exc:
                log(f"control plane error: {exc.code().name}: {exc.details()}")
                if exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    raise SystemExit(2) from None
        if time.monotonic() - started > 60:
            backoff = 1.0  # the connection was healthy for a while: start over
        log(f"reconnecting in {backoff:.0f} s")
        time.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--target", default="127.0.0.1:8081", help="control plane HOST:PORT")
    p.add_argument(
        "--token",
        default=os.environ.get("AIBRIDGED_CONTROL_TOKEN"),
        help="control token (default: $AIBRIDGED_CONTROL_TOKEN)",
    )
    p.add_argument("--provider-url", default="https://api.anthropic.com", help="Anthropic base URL")
    p.add_argument(
        "--provider-key",
        default=os.environ.get("ANTHROPIC_API_KEY", ""),
        help="central provider key (default: $ANTHROPIC_API_KEY)",
    )
    p.add_argument("--client-key", required=True, help="client API key (pushed as sha256 only)")
    p.add_argument("--actor-id", default="example-actor", help="actor the client key maps to")
    p.add_argument("--username", default="example", help="actor's display name")
    p.add_argument(
        "--state",
        type=Path,
        default=Path("host-state.json"),
        help="cursor file (epoch, last acked seq)",
    )
    args = p.parse_args(argv)
    if not args.token:
        p.error("--token or AIBRIDGED_CONTROL_TOKEN is required")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    # Ctrl-C and SIGTERM both exit cleanly (SIGINT may be inherited as ignored: set it anyway).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(args)
    except KeyboardInterrupt:
        log("interrupted; cursor saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
