"""Audience: who receives an issue, as read from outside (the CSV import and export)."""
