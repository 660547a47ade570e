"""Delivery: a RenderedIssue and a frozen audience become messages on the wire.

message (one MIME message per recipient from one skeleton) → dkim_sign →
campaign (the async send loop, pacing from ratelimit) over a transport
(transports/: SMTP, outbox, memory); sending is the use case that starts,
resumes and reports one send."""
