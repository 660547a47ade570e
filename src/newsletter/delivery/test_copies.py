"""Test copies: a built issue and a few addresses → one copy each, outside the send log.

Input: the addresses asked for (``send --to``), the list the issue is for, the
:class:`~newsletter.storage.base.Storage` when there is a database (None on a
first try-out: nobody to protect yet), and for the send a
:class:`~newsletter.delivery.message.MessageTemplate` and a transport. Output:
:class:`CopyCheck` (the addresses to mail, the problems that refuse them all,
the warnings), the :class:`Recipient` of each, and a :class:`CopyResult` per
copy sent. :func:`send_test_copies` is the whole of ``send --to`` in order;
nothing here prints: warnings go to a callback, and the CLI prints.

A test copy is real mail. A suppressed address (it complained or bounced) is
refused; one that opted out of the list is warned about and mailed; a merge
field the real send would refuse is warned about (the copy shows it empty). A
subscriber gets their own merge-field values (an editor sends one to themselves
to see them); anyone else the fallbacks. Each copy has a message id of its own,
never the real message's: a receiver would drop the real one later as a
duplicate of the test copy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from newsletter.audience.csv_import import normalise_address
from newsletter.delivery.message import MessageTemplate
from newsletter.delivery.sending import check_merge_fields
from newsletter.delivery.transports import Envelope, Transport
from newsletter.errors import ConfigError, ValidationFailed
from newsletter.models import Outcome, Recipient
from newsletter.render.merge_fields import FieldUse
from newsletter.storage.base import Storage

__all__ = [
    "CopiesRefused",
    "CopyCheck",
    "CopyResult",
    "check_addresses",
    "field_warnings",
    "recipients",
    "send_copies",
    "send_test_copies",
]


@dataclass(frozen=True, slots=True)
class CopyCheck:
    """The addresses asked for, checked: whom to mail, and what stands in the way."""

    addresses: list[str]  # normalised, each once, in the order asked
    problems: list[str] = field(default_factory=list)  # any of them: no copy is sent
    warnings: list[str] = field(default_factory=list)  # said, and the copies go all the same


@dataclass(frozen=True, slots=True)
class CopyResult:
    email: str
    outcome: Outcome

    @property
    def sent(self) -> bool:
        return self.outcome.state == "sent"


def field_warnings(
    storage: Storage | None, issue_id: str, list_name: str, uses: Sequence[FieldUse]
) -> list[str]:
    """The merge-field problems the real send to ``list_name`` would refuse: a test copy
    goes whatever the list offers, but they are worth knowing now."""
    if not uses or storage is None:
        return []
    try:
        check_merge_fields(storage, issue_id, list_name, uses)
    except ValidationFailed as exc:
        return [str(problem) for problem in exc.problems]
    return []


def check_addresses(
    storage: Storage | None, raw: Sequence[str], list_name: str, *, asked_by: str = "--to"
) -> CopyCheck:
    """Normalise the addresses; refuse a bad one or a suppressed one, warn of an opt-out
    of ``list_name``. Without a database there is nobody to protect yet. ``asked_by``
    names where the addresses came from, in the problems."""
    checked: list[str] = []
    problems: list[str] = []
    for address in raw:
        try:
            checked.append(normalise_address(address))
        except ValueError as exc:
            problems.append(f"{asked_by} {address!r} is not a valid address: {exc}")
    unique = list(dict.fromkeys(checked))  # one copy each
    warnings: list[str] = []
    if storage is not None:
        store = storage.subscribers
        for address in unique:
            info = store.suppression_info(address)
            if info is not None:
                problems.append(
                    f"{asked_by} {address} is suppressed ({info.reason} since {info.since}) and "
                    "is never mailed; if the person asked to be mailed again, lift it with "
                    f"`newsletter subscribers unsuppress {address} --reason TEXT`"
                )
            elif (list_name, True) in store.lists_of(address):
                warnings.append(
                    f"{address} opted out of {list_name}; the test copy goes to it all the same"
                )
    return CopyCheck(unique, problems, warnings)


def recipients(storage: Storage | None, addresses: Sequence[str]) -> list[Recipient]:
    """Each address as a recipient: a subscriber's own merge values, or the fallbacks."""
    if storage is None:
        return [Recipient(a) for a in addresses]
    store = storage.subscribers
    return [store.recipient(a) or Recipient(a) for a in addresses]


def send_copies(
    template: MessageTemplate,
    to: Sequence[Recipient],
    transport: Transport,
    *,
    envelope_sender: str,
) -> list[CopyResult]:
    """Send one copy to each of ``to`` over one session, in order; raises ConnectFailed
    when the session cannot be opened (nothing was sent)."""

    async def go() -> list[CopyResult]:
        session = await transport.open()
        out = []
        try:
            for r in to:
                data = template.personalise(
                    r,
                    date=dt.datetime.now(dt.UTC),
                    message_id=template.test_message_id(secrets.token_hex(8)),
                )
                outcome = await session.send(Envelope(envelope_sender, r.email, data))
                out.append(CopyResult(r.email, outcome))
        finally:
            await session.close()
        return out

    return asyncio.run(go())


class CopiesRefused(ConfigError):
    """An address asked for may not be mailed (suppressed, or not an address): no copy goes."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("no test copy was sent:\n" + "\n".join(f"  {p}" for p in problems))


def send_test_copies(
    storage: Storage | None,
    *,
    issue_id: str,
    uses: Sequence[FieldUse],
    list_name: str,
    addresses: Sequence[str],
    make_template: Callable[[], MessageTemplate],
    transport_for: Callable[[int], Transport],
    envelope_sender: str,
    warn: Callable[[str], None],
) -> list[CopyResult]:
    """``send --to``: warn of merge fields the real send would refuse, check the addresses
    (any problem refuses them all: :class:`CopiesRefused`, nothing sent), then send one
    copy to each through ``transport_for(how many)``. The template is made after the
    field warnings, so that its own warnings (DKIM) come in the order they always have."""
    for problem in field_warnings(storage, issue_id, list_name, uses):
        warn(f"{problem} (`send` refuses this; the test copy shows it empty)")
    template = make_template()
    check = check_addresses(storage, addresses, list_name)
    for warning in check.warnings:
        warn(warning)
    if check.problems:
        raise CopiesRefused(check.problems)
    to = recipients(storage, check.addresses)
    return send_copies(template, to, transport_for(len(to)), envelope_sender=envelope_sender)
