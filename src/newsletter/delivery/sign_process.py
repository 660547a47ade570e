"""Signing stage, on two cores: messages → DKIM-signed messages, signed in a second process.

Input: a :class:`~newsletter.delivery.dkim_sign.DkimKey` and, during a send, each
message's bytes. Output: the message with its DKIM-Signature in front, as
:func:`~newsletter.delivery.dkim_sign.sign` makes it.

A signature costs about 0.5 ms (half of it the RSA operation, the rest the body's
canonical hash and the header's), and the send's event loop spends about 0.25 ms on
everything else a message needs: signed in the loop, a send goes at a third of its
unsigned speed. A helper process (this module run as ``python -m
newsletter.delivery.sign_process``) gets each message down a pipe and sends back its
DKIM-Signature header, while the loop composes and sends on the other connections.
A thread would not do: the loop holds the GIL nearly all the time.

The helper is optional in every way: until it is ready, after it dies, or on a
machine with one CPU, signatures are made in this process, so a send never waits
for it and never fails because of it. Its first signature and one in
:data:`CHECK_EVERY` after are checked here with the public key (a wrong one would
fail DMARC for that recipient, silently); one that fails the check stops it.

The pipe protocol: the key (a 4-byte big-endian length, then the selector, the domain
and the PEM, a line feed between each); then requests of an
8-byte id, a 4-byte length and the message; answers of the 8-byte id, a 4-byte
length and the header. The helper ends when its input does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from newsletter.delivery.dkim_sign import (
    DkimKey,
    check_line_ends,
    prepare,
    sign,
    signature,
    verifies,
)

__all__ = ["DkimSigner"]

_HEAD = struct.Struct(">QI")  # a request's or an answer's id and length
_LENGTH = struct.Struct(">I")
_READY = b"R"
CHECK_EVERY = 100
ANSWER_TIMEOUT = 5.0  # seconds a signature may take before the helper is given up on
_T = re.compile(rb"\bt=(\d+);")
_B = re.compile(rb"\bb=([A-Za-z0-9+/=\s]+)\r\n$")
# A helper that has not answered "ready" in this long is given up on for the send.
_START_TIMEOUT = 30.0


class DkimSigner:
    """A DKIM signer: call it to sign in this process; during a send
    (:meth:`helping`), :meth:`signed` has a helper process sign."""

    def __init__(self, key: DkimKey, *, processes: int | None = None) -> None:
        self.key = key
        # One helper at most (it has more to do than the loop; a second would need a
        # third CPU). None: one where there is a second CPU to run it.
        self.processes = (1 if (os.cpu_count() or 1) > 1 else 0) if processes is None else processes
        self._helper: _Helper | None = None
        self.by_helper = 0  # signatures the helper made (for the benchmark and tests)
        self.in_process = 0

    def __call__(self, message: bytes) -> bytes:
        self.in_process += 1
        return sign(message, self.key)

    async def signed(self, message: bytes) -> bytes:
        """``message`` signed, by the helper when it is up."""
        helper = self._helper
        if helper is None or not helper.ready:
            return self(message)
        # Checked here, not there: its error is this process's to raise, and the helper,
        # the busier of the two, has that much less to do.
        check_line_ends(message)
        header = await helper.signature(message)
        checked = self.by_helper % CHECK_EVERY == 0
        if header is None or (checked and not self._right(message, header)):
            # Gone, hung or wrong: this process signs from now on (once for all the
            # connections that were waiting on it).
            if self._helper is helper:
                self._helper = None
                helper.kill()
            return self(message)
        self.by_helper += 1
        return header + message

    def _right(self, message: bytes, header: bytes) -> bool:
        """Whether the helper's ``header`` is the one this process would have made."""
        when, signed = _T.search(header), _B.search(header)
        if when is None or signed is None:
            return False
        pending = prepare(message, self.key, timestamp=int(when.group(1)), line_ends_checked=True)
        raw = base64.b64decode(b"".join(signed.group(1).split()))
        return verifies(self.key, pending.digest, raw) and pending.finish(raw) == header

    @contextlib.asynccontextmanager
    async def helping(self) -> AsyncIterator[None]:
        """The helper process for the length of the block (a send), when there is one."""
        if self.processes < 1:
            yield
            return
        helper = _Helper(self.key)
        self._helper = helper
        starting = asyncio.create_task(helper.start())
        try:
            yield
        finally:
            self._helper = None
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await helper.close()


class _Helper:
    """The client side of one helper process."""

    def __init__(self, key: DkimKey) -> None:
        self.key = key
        self.ready = False
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[bytes | None]] = {}
        self._next = 0

    async def start(self) -> None:
        package = Path(__file__).resolve().parents[2]  # where `newsletter` is importable
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "newsletter.delivery.sign_process",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL, env=env,
            )  # fmt: skip
        except OSError:
            return  # no helper: every signature is made in this process
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        names = [self.key.selector.encode(), self.key.domain.encode()]
        key = b"\n".join([*names, self.key.private_key])
        proc.stdin.write(_LENGTH.pack(len(key)) + key)
        try:
            said = await asyncio.wait_for(proc.stdout.readexactly(1), _START_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            await self.close()
            return
        if said == _READY:
            self._reader = asyncio.create_task(self._answers(proc.stdout))
            self.ready = True

    async def signature(self, message: bytes) -> bytes | None:
        """The helper's DKIM-Signature header for ``message``; None when it is gone."""
        proc = self._proc
        if not self.ready or proc is None or proc.stdin is None or proc.stdin.is_closing():
            return None
        self._next += 1
        waiter: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = waiter
        try:
            proc.stdin.write(_HEAD.pack(self._next, len(message)))
            proc.stdin.write(message)
        except (OSError, RuntimeError):
            self._waiting.pop(self._next, None)
            return None
        try:
            # A helper that stopped answering (stopped, swapped out) must not stall the
            # send: a signature takes half a millisecond; this is a hundred thousand.
            return await asyncio.wait_for(waiter, ANSWER_TIMEOUT)
        except TimeoutError:
            self.ready = False
            return None

    async def _answers(self, stdout: asyncio.StreamReader) -> None:
        try:
            while True:
                answer_id, length = _HEAD.unpack(await stdout.readexactly(_HEAD.size))
                header = await stdout.readexactly(length)
                waiter = self._waiting.pop(answer_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(header)
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self.ready = False
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_result(None)
            self._waiting.clear()

    def kill(self) -> None:
        """Stop the helper at once (it hung, or signed wrongly); close() reaps it."""
        self.ready = False
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()

    async def close(self) -> None:
        self.ready = False
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()  # the helper ends when its input does
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def _serve() -> None:
    """The helper: the key from standard input, then a signature for each message."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    head = stdin.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return
    selector, domain, pem = stdin.read(_LENGTH.unpack(head)[0]).split(b"\n", 2)
    key = DkimKey(selector.decode("ascii"), domain.decode("ascii"), pem)
    stdout.write(_READY)
    stdout.flush()
    while len(asked := stdin.read(_HEAD.size)) == _HEAD.size:
        request_id, length = _HEAD.unpack(asked)
        message = stdin.read(length)
        if len(message) < length:
            return
        try:
            header = signature(message, key, line_ends_checked=True)
        except ValueError:
            return  # not a message this signer signs: the sender's own process says why
        stdout.write(_HEAD.pack(request_id, len(header)) + header)
        stdout.flush()


if __name__ == "__main__":
    _serve()
