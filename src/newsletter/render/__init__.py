"""Render: an issue file becomes a RenderedIssue (HTML, plain text, message skeleton), once.

Stages in order: yaml_input (YAML with line numbers) → loading (validated models)
→ markdown and templating (Jinja) → mjml_compile → inliner (premailer) →
checks (size, links, accessibility), run in order by pipeline (the issue
rendered once); output writes the build folder. placeholders and merge_fields
carry the per-recipient slots through; issue_ids names issues. The whole build,
which also composes a preview message, is newsletter.build, above this package:
nothing here imports delivery, storage, schedule or web (tests/test_layout.py)."""
