"""Render: an issue file becomes a RenderedIssue (HTML, plain text, message skeleton), once.

Stages in order: yaml_input (YAML with line numbers) → loading (validated models)
→ markdown and templating (Jinja) → mjml_compile → inliner (premailer) →
checks (size, links, accessibility) → pipeline (the whole build) → output (the
build folder). placeholders and merge_fields carry the per-recipient slots
through; issue_ids names issues. Nothing here touches delivery or storage."""
