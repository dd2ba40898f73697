#!/usr/bin/env python3
"""Runs INSIDE a sandbox: relay 127.0.0.1:8417 to the git gateway's unix socket.

It holds no secret and no token; it moves bytes. Stdlib only (the sandbox has python3).

    python3 /run/corral/git_forwarder.py [--socket /run/corral/git.sock] [--port 8417] [-- COMMAND ...]

With a COMMAND, it listens, runs the command, and exits with the command's status.
"""

import argparse
import asyncio
import errno
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(args: argparse.Namespace) -> int:
    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_unix_connection(args.socket)
        except OSError as err:
            print(f"git_forwarder: cannot reach {args.socket}: {err}", file=sys.stderr)
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    try:
        server = await asyncio.start_server(relay, "127.0.0.1", args.port)
    except OSError as err:
        if not args.command or err.errno != errno.EADDRINUSE:
            raise
        return await run(args.command)  # another forwarder in this sandbox already relays the port
    async with server:
        if not args.command:
            await server.serve_forever()
        return await run(args.command)


async def run(command: list[str]) -> int:
    proc = await asyncio.create_subprocess_exec(*command)
    return await proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", default="/run/corral/git.sock")
    parser.add_argument("--port", type=int, default=8417)
    parser.add_argument("command", nargs="*")
    sys.exit(asyncio.run(main(parser.parse_args())))
