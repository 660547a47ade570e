"""Hearing back from the mail system: bounces, complaints, mailed unsubscribes."""
