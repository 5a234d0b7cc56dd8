"""A catch-all recorder run inside a test network namespace: accepts on ports 80 and 443 of every
address (IPv4 and IPv6) and appends `address port bytes` to a file for every chunk it receives.

    python -m tests.adversarial.nsrecorder OUTFILE     (started with nsenter by test_adv_netns.py)
"""

from __future__ import annotations

import asyncio
import socket
import sys


async def main(out_path: str) -> None:
    out = open(out_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def handler(port: int):  # type: ignore[no-untyped-def]
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            local = writer.get_extra_info("sockname")[0]
            out.write(f"{local} {port} 0\n")
            while data := await reader.read(65536):
                out.write(f"{local} {port} {len(data)}\n")
            writer.close()

        return handle

    servers = []
    for port in (80, 443):
        servers.append(await asyncio.start_server(handler(port), "0.0.0.0", port))
        with_v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            with_v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            with_v6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with_v6.bind(("::", port))
            with_v6.listen(100)
            servers.append(await asyncio.start_server(handler(port), sock=with_v6))
        except OSError:
            with_v6.close()
    out.write("ready 0 0\n")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
