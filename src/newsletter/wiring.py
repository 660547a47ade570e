"""Wiring: the settings → the typed inputs each stage takes.

Input: a :class:`~newsletter.settings.Settings`. Output: the values the stages take
instead of it: the :class:`~newsletter.delivery.message.Sender` of a list, the
:class:`~newsletter.build.BuildInputs` of an issue, the SMTP transport, the
DKIM signer (with the warnings its key and domain call for), the
:class:`~newsletter.delivery.campaign.SendOptions`, the webhooks `serve` answers,
what `doctor` checks.
No stage reads the settings itself; the CLI calls these, prints what they warn of,
and passes the values on.
A setting that cannot be used is a :class:`~newsletter.errors.ConfigError`.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import SecretStr

from newsletter.bounces.mailbox import DEFAULT_PORTS, ImapAccount
from newsletter.bounces.refusals import HealthLimits
from newsletter.build import BuildInputs
from newsletter.delivery import dkim_sign
from newsletter.delivery.campaign import SendOptions
from newsletter.delivery.message import Sender
from newsletter.delivery.sign_process import DkimSigner
from newsletter.delivery.transports import (
    Relay,
    RelayPool,
    SmtpConfig,
    SmtpTransport,
    Transport,
)
from newsletter.errors import ConfigError
from newsletter.models import Recipient, Society
from newsletter.settings import Settings

if TYPE_CHECKING:
    from newsletter.doctor import DoctorInputs
    from newsletter.doctor.relay import RelaySetup
    from newsletter.relay_settings import RelaySettings
    from newsletter.signup.joining import SignupPolicy
    from newsletter.storage.signups import OutboxMail, PendingSignup
    from newsletter.web.webhooks import WebhookConfig

__all__ = [
    "build_inputs",
    "doctor_inputs",
    "imap_accounts",
    "require_secret",
    "send_options",
    "sender",
    "signer",
    "smtp_transport",
]


def sender(settings: Settings, list_name: str | None = None) -> Sender:
    """Who sends to ``list_name`` (default: NEWSLETTER_LIST_NAME), and where links point."""
    return Sender(
        name=settings.sender_name,
        address=settings.sender_address,
        list_name=list_name or settings.list_name,
        public_url=settings.public_url,
        token_key=settings.token_key,
        unsubscribe_mailto=settings.unsubscribe_address,
        reply_to=settings.reply_to,
    )


def build_inputs(
    settings: Settings, issue_file: Path, strict: bool, list_name: str | None = None
) -> BuildInputs:
    """What the build of ``issue_file`` for ``list_name`` takes."""
    preview_name, preview_addr = settings.preview_mailbox
    # "Sam Sample", or "Sample, Sam" as address books write it.
    last, comma, first = preview_name.partition(",")
    if not comma:
        first, _, last = preview_name.partition(" ")
    return BuildInputs(
        issue_file=issue_file,
        society_file=settings.society_file,
        templates_dir=settings.templates_dir,
        sender=sender(settings, list_name),
        preview_recipient=Recipient(preview_addr, first.strip(), last.strip()),
        strict=strict,
    )


def require_secret(settings: Settings) -> None:
    """Real mail (a send or a test copy) carries links the live server must accept."""
    if settings.secret_key is None:
        raise ConfigError(
            "NEWSLETTER_SECRET_KEY is not set: unsubscribe links would not be secure. "
            'Make one with: python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
        )


def smtp_transport(settings: Settings) -> Transport:
    """The relay the settings name, with its TLS context (the CA file read now), or the
    pool of NEWSLETTER_SMTP_RELAYS, each relay with its own."""
    helo_name = settings.smtp_helo_name or settings.sender_address.rpartition("@")[2]
    if settings.relays:
        return _relay_pool(settings, helo_name)
    context = _tls_context(settings.smtp_ca_file, "NEWSLETTER_SMTP_CA_FILE")
    return SmtpTransport(
        SmtpConfig(
            host=settings.smtp_host,
            port=settings.smtp_port_or_default,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
            helo_name=helo_name,
            timeout=settings.smtp_timeout,
            message_timeout=settings.send_message_timeout,
            tls_context=context if settings.smtp_security != "none" else None,
        )
    )


def _relay_tls(settings: Settings, index: int, relay: RelaySettings) -> ssl.SSLContext:
    """What relay ``index`` of NEWSLETTER_SMTP_RELAYS is verified with: its own CA file,
    or NEWSLETTER_SMTP_CA_FILE (a send and the doctor alike)."""
    if relay.ca_file is not None:
        return _tls_context(relay.ca_file, f"NEWSLETTER_SMTP_RELAYS[{index}].ca_file")
    return _tls_context(settings.smtp_ca_file, "NEWSLETTER_SMTP_CA_FILE")


def _relay_pool(settings: Settings, helo_name: str) -> RelayPool:
    relays = []
    for index, r in enumerate(settings.relays):
        where = f"NEWSLETTER_SMTP_RELAYS[{index}]"
        context = _relay_tls(settings, index, r) if r.security != "none" else None
        config = SmtpConfig(
            host=r.host,
            port=r.port_or_default,
            security=r.security,
            username=r.username,
            password=r.password.get_secret_value() if r.password else None,
            helo_name=helo_name,
            timeout=settings.smtp_timeout,
            message_timeout=settings.send_message_timeout,
            tls_context=context,
            where=where,
        )
        relays.append(
            Relay(
                SmtpTransport(config),
                connections=r.connections or settings.send_connections,
                rate=r.rate,
                weight=r.weight,
                name=f"relay [{index}] {r.host}:{r.port_or_default}",
            )
        )
    return RelayPool(relays)


def _tls_context(ca_file: Path | None, setting: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{setting}={ca_file}: cannot read certificates from it "
            f"({getattr(exc, 'strerror', None) or exc}); give a PEM file of CA certificates, "
            "or unset it"
        ) from None


def imap_accounts(settings: Settings) -> list[ImapAccount]:
    """The mailboxes `bounces fetch` reads, with their TLS contexts (CA files read now):
    the bounce mailbox when it is set, and the unsubscribe mailbox when it has its own
    (each of its settings left unset is the bounce mailbox's)."""
    bounce = (
        settings.bounce_imap_host,
        settings.bounce_imap_port,
        settings.bounce_imap_security,
        settings.bounce_imap_username,
        settings.bounce_imap_password,
        settings.bounce_imap_folder,
        settings.bounce_imap_processed_folder,
        settings.bounce_imap_ca_file,
    )
    wanted = [("NEWSLETTER_BOUNCE_IMAP", bounce)] if any(
        (settings.bounce_imap_host, settings.bounce_imap_username, settings.bounce_imap_password)
    ) or not settings.unsubscribe_mailbox_set else []  # fmt: skip
    if settings.unsubscribe_mailbox_set:
        s = settings
        own_host = s.unsubscribe_imap_host
        # Another server: nothing of the bounce mailbox's connection or login is taken
        # (its password is never sent to a host it is not for).
        elsewhere = own_host is not None and _host(own_host) != _host(s.bounce_imap_host or "")
        security = s.unsubscribe_imap_security or ("tls" if elsewhere else s.bounce_imap_security)
        same_way = not elsewhere and security == s.bounce_imap_security
        # The login is one: a user name of its own with the bounce mailbox's password
        # would be a wrong login.
        own_login = elsewhere or s.unsubscribe_imap_username or s.unsubscribe_imap_password
        wanted.append(("NEWSLETTER_UNSUBSCRIBE_IMAP", (
            own_host or s.bounce_imap_host,
            s.unsubscribe_imap_port or (s.bounce_imap_port if same_way else None),
            security,
            s.unsubscribe_imap_username if own_login else s.bounce_imap_username,
            s.unsubscribe_imap_password if own_login else s.bounce_imap_password,
            s.unsubscribe_imap_folder or s.bounce_imap_folder,
            s.unsubscribe_imap_processed_folder or s.bounce_imap_processed_folder,
            s.unsubscribe_imap_ca_file or (None if elsewhere else s.bounce_imap_ca_file),
        )))  # fmt: skip
    return [_imap_account(prefix, *values) for prefix, values in wanted]


def _host(name: str) -> str:
    return name.lower().rstrip(".")


def _imap_account(
    prefix: str,
    host: str | None,
    port: int | None,
    security: Literal["tls", "starttls", "none"],
    username: str | None,
    password: SecretStr | None,
    folder: str,
    processed_folder: str,
    ca_file: Path | None,
) -> ImapAccount:
    missing = [
        f"{prefix}_{name}"
        for name, value in (("HOST", host), ("USERNAME", username), ("PASSWORD", password))
        if value is None
    ]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "`bounces fetch` reads the mailbox over IMAP and needs its server and login "
            "(or deliver that mail to `bounces process` from the MTA instead)"
        )
    assert host is not None and username is not None and password is not None
    context = _tls_context(ca_file, f"{prefix}_CA_FILE") if security != "none" else None
    return ImapAccount(
        host=host,
        port=port or DEFAULT_PORTS[security],
        security=security,
        username=username,
        password=password.get_secret_value(),
        folder=folder,
        processed_folder=processed_folder,
        tls_context=context,
        settings=prefix,
    )


def signer(settings: Settings) -> tuple[Callable[[bytes], bytes] | None, list[str]]:
    """DKIM signing when a key is configured (the preview in build/ is never signed), and
    the warnings to show: a d= that DMARC will not count, a weak key."""
    if settings.dkim_key_file is None or settings.dkim_selector is None:
        return None, []
    from_domain = settings.sender_address.rpartition("@")[2].lower()
    domain = (settings.dkim_domain or from_domain).lower()
    key = dkim_sign.load_key(settings.dkim_key_file, settings.dkim_selector, domain)
    warnings = []
    if from_domain != domain and not from_domain.endswith("." + domain):
        # DMARC passes on DKIM only when d= is the From domain or a parent of it.
        warnings.append(
            f"NEWSLETTER_DKIM_DOMAIN {domain!r} is not the From domain "
            f"{from_domain!r} or a parent of it: DMARC will not count this signature"
        )
    if key.weak:
        warnings.append(
            f"the DKIM key {settings.dkim_key_file} (NEWSLETTER_DKIM_KEY_FILE) is "
            f"{key.bits}-bit RSA; use {dkim_sign.GOOD_BITS} bits, as receivers recommend"
        )
    return DkimSigner(key), warnings


def send_options(settings: Settings) -> SendOptions:
    """How fast and how patiently a send goes (NEWSLETTER_SEND_*)."""
    # Several relays: a worker for each connection they may have (relay_settings).
    connections = settings.send_connections
    if settings.relays:
        connections = sum(r.connections or connections for r in settings.relays)
    return SendOptions(
        connections=connections,
        rate=settings.send_rate,
        per_hour=settings.send_per_hour,
        per_day=settings.send_per_day,
        max_consecutive_errors=settings.send_max_errors,
        max_wait=settings.send_max_wait,
        health=HealthLimits(
            settings.send_pause_hard_bounces,
            settings.send_pause_complaints,
            settings.send_pause_sample,
        ),
        soft=settings.soft_bounces,
    )


def webhook_config(settings: Settings) -> WebhookConfig:
    """The providers' webhooks `serve` answers (NEWSLETTER_WEBHOOK_*), each off unless set."""
    from newsletter.web.webhooks import WebhookConfig  # Starlette: for `serve` only

    mailgun = settings.webhook_mailgun_key
    password = settings.webhook_postmark_password
    user = settings.webhook_postmark_user
    return WebhookConfig(
        verp=settings.verp,
        soft=settings.soft_bounces,
        ses_topics=settings.ses_topics,
        mailgun_key=None if mailgun is None else mailgun.get_secret_value().encode(),
        sendgrid_key=settings.webhook_sendgrid_key,
        postmark_login=(user, password.get_secret_value()) if user and password else None,
    )


def signup_policy(settings: Settings, society: Society) -> SignupPolicy | None:
    """The public signup's rules (society.yaml's `signup`, NEWSLETTER_SIGNUP_*), or None
    when the society offers no public signup."""
    from newsletter.signup.joining import SignupPolicy

    if society.signup is None:
        return None
    if society.signup.welcome:
        from newsletter.signup.mails import welcome_templates_present

        if not welcome_templates_present(settings.templates_dir):  # raises for half a pair
            raise ConfigError(
                f"society.yaml asks for a welcome email (signup: welcome: true), but "
                f"{settings.templates_dir} has no welcome.mjml.j2 and welcome.txt.j2; add "
                "them (`templates/` in the project has examples), or set welcome: false"
            )
    return SignupPolicy(
        lists=tuple(society.signup.lists),
        consent_text=society.signup.consent,
        key=settings.token_key,
        confirm_valid=dt.timedelta(hours=settings.signup_confirm_hours),
        ip_limit=settings.signup_ip_limit,
        address_limit=settings.signup_address_limit,
        challenge=settings.signup_challenge,
        welcome=society.signup.welcome,
    )


def signup_composer(
    settings: Settings, society: Society, policy: SignupPolicy
) -> Callable[[OutboxMail, PendingSignup], bytes]:
    """The signup mailer's composer: an outbox entry and its signup → the confirmation
    or welcome message, signed with DKIM when configured. Its Message-ID is the entry's
    own, so a retry after a deferral carries the same one."""
    import hashlib
    import hmac

    from newsletter import tokens
    from newsletter.render.templating import load_templates
    from newsletter.signup import links, mails

    templates = load_templates(settings.templates_dir)
    sign, _ = signer(settings)
    base = settings.public_url.rstrip("/")
    domain = settings.sender_address.rpartition("@")[2]

    def compose(mail: OutboxMail, signup: PendingSignup) -> bytes:
        now = dt.datetime.now(dt.UTC)
        # The same id when the same mail is tried again; the signup's random nonce makes
        # it new for a new mail, whose row may take the number of a deleted one (SQLite).
        seed = f"outbox {mail.id} {signup.nonce}".encode()
        digest = hmac.new(policy.key, seed, hashlib.sha256)
        message_id = f"<{mail.kind}.{digest.hexdigest()[:24]}@{domain}>"
        titles = [policy.title(n) for n in signup.lists]
        common = {
            "sender_name": settings.sender_name, "sender_address": settings.sender_address,
            "to": signup.email, "first_name": signup.first_name, "lists": titles,
            "public_url": base, "date": now, "signer": sign, "reply_to": settings.reply_to,
            "message_id": message_id,
        }  # fmt: skip
        if mail.kind == "confirm":
            token = links.confirm_token(policy.key, signup.id, signup.nonce)
            return mails.confirmation_message(
                templates, society, confirm_url=f"{base}/confirm/{token}",
                expires_at=dt.datetime.fromisoformat(signup.expires_at), **common,  # type: ignore[arg-type]
            )  # fmt: skip
        first = signup.lists[0]
        preferences = tokens.make(policy.key, tokens.Kind.PREFERENCES, first, signup.email, now)
        unsubscribe = tokens.make(policy.key, tokens.Kind.UNSUBSCRIBE, first, signup.email, now)
        return mails.welcome_message(
            templates, society, preferences_url=f"{base}/preferences/{preferences}",
            unsubscribe_url=f"{base}/unsubscribe/{unsubscribe}",
            unsubscribe_mailto=settings.unsubscribe_address, **common,  # type: ignore[arg-type]
        )  # fmt: skip

    return compose


def doctor_inputs(settings: Settings) -> DoctorInputs:
    """What `newsletter doctor` checks: the domains, key, relay and URL a send uses.

    A DKIM key that cannot be loaded is a finding of the doctor's, not an error here;
    a CA file that cannot be read is a ConfigError, as it is for a send."""
    from newsletter.doctor import DoctorInputs
    from newsletter.doctor.one_click import OneClickSetup

    key, problem = None, None
    if settings.dkim_key_file is not None and settings.dkim_selector is not None:
        domain = (settings.dkim_domain or settings.sender_address.rpartition("@")[2]).lower()
        try:
            key = dkim_sign.load_key(settings.dkim_key_file, settings.dkim_selector, domain)
        except ConfigError as exc:
            problem = str(exc)
    secret = settings.secret_key
    return DoctorInputs(
        from_address=settings.sender_address,
        envelope_sender=settings.envelope_sender,
        dkim_key=key,
        dkim_problem=problem,
        relays=_doctor_relays(settings),
        one_click=OneClickSetup(
            public_url=settings.public_url,
            token_key=settings.unsubscribe_token_key,
            list_name=settings.list_name,
            # The system's CAs, as a mailbox provider's would be (SSL_CERT_FILE overrides).
            tls_context=ssl.create_default_context(),
        ),
        issues_dir=settings.issues_dir,
        build_inputs=lambda issue: build_inputs(settings, issue, strict=False),
        society_file=settings.society_file,
        secret_key=None if secret is None else secret.get_secret_value(),
        dns_server=settings.dns_resolver_address,
    )


def _doctor_relays(settings: Settings) -> tuple[RelaySetup, ...]:
    """The relays a send uses, as the doctor checks them."""
    from newsletter.doctor.relay import RelaySetup  # the doctor's modules load when asked

    helo = settings.smtp_helo_name or settings.sender_address.rpartition("@")[2]
    timeout = min(settings.smtp_timeout, 10.0)
    if not settings.relays:
        return (
            RelaySetup(
                host=settings.smtp_host,
                port=settings.smtp_port_or_default,
                security=settings.smtp_security,
                helo_name=helo,
                tls_context=_tls_context(settings.smtp_ca_file, "NEWSLETTER_SMTP_CA_FILE"),
                timeout=timeout,
            ),
        )
    return tuple(
        RelaySetup(
            host=relay.host,
            port=relay.port_or_default,
            security=relay.security,
            helo_name=helo,
            tls_context=_relay_tls(settings, i, relay),
            timeout=timeout,
            index=i,
        )
        for i, relay in enumerate(settings.relays)
    )
