"""Delivery: a RenderedIssue and a frozen audience become messages on the wire.

message (one MIME message per recipient from one skeleton) → dkim_sign →
campaign (the async send loop, pacing from ratelimit) over a transport
(transports/: SMTP, outbox, memory). send_issue is the send use case (build,
checks, lease, confirmation, prepare, archive, campaign) that the CLI, the
scheduler and the benchmark call; sending holds its steps (preview, prepare,
run_send); provenance checks which file an issue id was sent from and keeps
the archive's web version; test_copies sends ``send --to``'s copies."""
