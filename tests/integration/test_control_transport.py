"""Control-plane transport: unix sockets, TLS, mutual TLS, and how open streams end at shutdown."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import aiohttp
import grpc
import orjson
import pytest

from control.v1 import control_pb2 as pb
from control.v1.control_pb2_grpc import ControlServiceStub
from gateway.testing import Reply, load_txtar
from tests.conftest import CONTROL_METADATA, CONTROL_TOKEN, FIXTURES, GATEWAY_KEY, GatewayFactory

TEXT = load_txtar(FIXTURES / "anthropic" / "text.txtar")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI absent")


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    p = {
        name: tmp / name
        for name in ("ca.key", "ca.pem", "srv.key", "srv.pem", "cli.key", "cli.pem")
    }
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", str(p["ca.key"]), "-out", str(p["ca.pem"]))  # fmt: skip
    ext = tmp / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("srv", "cli"):
        csr = tmp / f"{who}.csr"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
                "-keyout", str(p[f"{who}.key"]), "-out", str(csr))  # fmt: skip
        openssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca.pem"]), "-CAkey",
                str(p["ca.key"]), "-CAcreateserial", "-days", "1", "-extfile", str(ext),
                "-out", str(p[f"{who}.pem"]))  # fmt: skip
    return p


async def status_over(channel: grpc.aio.Channel) -> pb.GetStatusResponse:
    stub = ControlServiceStub(channel)
    return await stub.GetStatus(pb.GetStatusRequest(), metadata=CONTROL_METADATA, timeout=5)


async def test_unix_socket_listener(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    await make_gateway(control_token=CONTROL_TOKEN, control_listen=f"unix:{sock}")
    assert sock.exists()
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        assert (await status_over(channel)).ready


@needs_openssl
async def test_tls_serves_only_tls(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    gw = await make_gateway(
        control_token=CONTROL_TOKEN,
        control_tls_cert_file=pki["srv.pem"],
        control_tls_key_file=pki["srv.key"],
    )
    creds = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"].read_bytes())
    async with grpc.aio.secure_channel(gw.control_target, creds) as channel:
        assert (await status_over(channel)).ready
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await status_over(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


@needs_openssl
async def test_mutual_tls_requires_a_client_certificate(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    gw = await make_gateway(
        control_token=CONTROL_TOKEN,
        control_tls_cert_file=pki["srv.pem"],
        control_tls_key_file=pki["srv.key"],
        control_tls_client_ca_file=pki["ca.pem"],
    )
    ca = pki["ca.pem"].read_bytes()
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=pki["cli.key"].read_bytes(),
        certificate_chain=pki["cli.pem"].read_bytes(),
    )
    async with grpc.aio.secure_channel(gw.control_target, with_cert) as channel:
        assert (await status_over(channel)).ready
    without_cert = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(gw.control_target, without_cert) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await status_over(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_open_usage_stream_ends_cleanly_at_shutdown_with_everything_sent(
    make_gateway: GatewayFactory,
) -> None:
    """Shutdown drains the data plane first, so the stream carries the draining request's records,
    then returns OK by itself (not cancelled by the server stopping)."""
    gw = await make_gateway(control_token=CONTROL_TOKEN)
    gw.upstream.enqueue(Reply.from_section(TEXT["streaming"], event_delay=0.05))
    received: list[pb.UsageRecord] = []
    async with grpc.aio.insecure_channel(gw.control_target) as channel:
        call = ControlServiceStub(channel).StreamUsage(
            pb.StreamUsageRequest(), metadata=CONTROL_METADATA
        )

        async def read() -> None:
            async for batch in call:
                received.extend(batch.records)

        reader = asyncio.create_task(read())
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"{gw.url}/v1/messages",
                json=dict(orjson.loads(TEXT["request"]), stream=True),
                headers={"x-api-key": GATEWAY_KEY},
            )
            assert b"message_start" in await resp.content.readany()
            stopping = asyncio.create_task(gw.daemon.stop())
            rest = await resp.read()
            assert rest.rstrip().endswith(b'"message_stop"}')
        await asyncio.wait_for(stopping, 15)
        await asyncio.wait_for(reader, 5)
        assert await call.code() == grpc.StatusCode.OK
    kinds = [str(r.WhichOneof("record")) for r in received]
    assert kinds.count("interception_ended") == 1
    assert sorted(kinds) == sorted(
        ["interception_started", "prompt_usage", "token_usage", "interception_ended"]
    )
