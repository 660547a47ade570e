"""DKIM signing in a helper process during a send: every signature verifies (dkimpy,
independent of ours), the helper really made them, and a helper that dies or signs
wrongly costs nothing but speed: this process signs instead, and no message is lost."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import signal
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import EXAMPLE, build_file, sender
from newsletter.delivery import dkim_sign
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.sign_process import DkimSigner, _Helper
from newsletter.models import Recipient


def _key(folder: Path, name: str) -> tuple[dkim_sign.DkimKey, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    (folder / f"{name}.pem").write_bytes(pem)
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = dkim_sign.load_key(folder / f"{name}.pem", "news", "example.org")
    return key, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dkim_sign.DkimKey, bytes]]:
    folder = tmp_path_factory.mktemp("sign-process")
    return {"ours": _key(folder, "ours"), "other": _key(folder, "other")}


def _verifies(raw: bytes, record: bytes) -> bool:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"news._domainkey.example.org."
        return record

    return bool(dkim.verify(raw, dnsfunc=lookup))


WHEN = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)


def _messages(
    project: Path, n: int, key: dkim_sign.DkimKey, processes: int
) -> tuple[MessageTemplate, DkimSigner, list[Recipient]]:
    """The example issue's template, signed by a new signer, and ``n`` people."""
    rendered = build_file(project / "issues" / EXAMPLE.name, project).rendered
    people = [Recipient(f"reader{i}@example.org", f"Reader {i}") for i in range(n)]
    signer = DkimSigner(key, processes=processes)
    return MessageTemplate(rendered, sender(), signer=signer), signer, people


async def _ready(signer: DkimSigner) -> _Helper:
    for _ in range(300):
        helper = signer._helper
        if helper is not None and helper.ready:
            return helper
        await asyncio.sleep(0.05)
    raise AssertionError("the helper process did not start within 15 s")


def test_signatures_made_by_the_helper_verify_and_match_this_processs(
    project: Path, keys: dict[str, tuple[dkim_sign.DkimKey, bytes]]
) -> None:
    key, record = keys["ours"]
    template, signer, people = _messages(project, 120, key, 1)

    async def go() -> list[bytes]:
        async with template.signing():
            await _ready(signer)
            return await asyncio.gather(*(template.personalised(p, date=WHEN) for p in people))

    signed = asyncio.run(go())
    assert signer.by_helper == len(people) and signer.in_process == 0
    assert signer._helper is None  # stopped with the send
    for person, raw in zip(people, signed, strict=True):
        assert _verifies(raw, record), person.email
        assert person.email.encode() in raw.split(b"\r\n\r\n", 1)[0]
    # Outside a send, the same signer signs in this process.
    alone = template.personalise(people[0], date=WHEN)
    assert _verifies(alone, record) and signer.in_process == 1


def test_a_helper_killed_mid_send_loses_no_message(
    project: Path, keys: dict[str, tuple[dkim_sign.DkimKey, bytes]]
) -> None:
    key, record = keys["ours"]
    template, signer, people = _messages(project, 60, key, 1)

    async def go() -> list[bytes]:
        async with template.signing():
            helper = await _ready(signer)
            first = [await template.personalised(p, date=WHEN) for p in people[:20]]
            assert helper._proc is not None
            os.kill(helper._proc.pid, signal.SIGKILL)
            rest = await asyncio.gather(*(template.personalised(p, date=WHEN) for p in people[20:]))
            return first + list(rest)

    signed = asyncio.run(go())
    assert len(signed) == len(people)
    assert all(_verifies(raw, record) for raw in signed)
    assert signer.by_helper >= 20 and signer.in_process >= 1
    assert signer.by_helper + signer.in_process == len(people)


def test_a_helper_that_signs_wrongly_is_stopped_at_its_first_signature(
    project: Path, keys: dict[str, tuple[dkim_sign.DkimKey, bytes]]
) -> None:
    key, record = keys["ours"]
    template, signer, people = _messages(project, 5, key, 0)

    async def go() -> list[bytes]:
        # A helper that holds another key: a real process, whose signatures do not verify.
        wrong = _Helper(keys["other"][0])
        await wrong.start()
        assert wrong.ready
        signer._helper = wrong
        try:
            return [await template.personalised(p, date=WHEN) for p in people]
        finally:
            await wrong.close()

    signed = asyncio.run(go())
    assert signer._helper is None and signer.by_helper == 0
    assert signer.in_process == len(people)
    assert all(_verifies(raw, record) for raw in signed)


def test_a_message_with_a_bare_line_feed_is_refused_with_or_without_the_helper(
    keys: dict[str, tuple[dkim_sign.DkimKey, bytes]],
) -> None:
    key, _ = keys["ours"]
    bad = b"From: a@example.org\r\nSubject: s\r\n\r\none\ntwo\r\n"

    async def go(processes: int) -> None:
        signer = DkimSigner(key, processes=processes)
        async with signer.helping():
            if processes:
                await _ready(signer)
            with pytest.raises(ValueError, match="bare CR or LF"):
                await signer.signed(bad)
            if processes:  # the helper is still there for the next message
                assert signer._helper is not None and signer._helper.ready

    asyncio.run(go(0))
    asyncio.run(go(1))


def test_a_helper_that_stops_answering_does_not_stall_the_send(
    project: Path, keys: dict[str, tuple[dkim_sign.DkimKey, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from newsletter.delivery import sign_process

    monkeypatch.setattr(sign_process, "ANSWER_TIMEOUT", 0.5)  # not the real 5 s
    key, record = keys["ours"]
    template, signer, people = _messages(project, 12, key, 1)

    async def go() -> list[bytes]:
        async with template.signing():
            helper = await _ready(signer)
            first = [await template.personalised(p, date=WHEN) for p in people[:2]]
            assert helper._proc is not None
            os.kill(helper._proc.pid, signal.SIGSTOP)  # alive, but answering nothing
            rest = await asyncio.gather(*(template.personalised(p, date=WHEN) for p in people[2:]))
            return first + list(rest)

    signed = asyncio.run(go())
    assert len(signed) == 12 and all(_verifies(raw, record) for raw in signed)
    assert signer.by_helper == 2 and signer.in_process == 10
    assert signer._helper is None  # given up on, and reaped at the end of the send
