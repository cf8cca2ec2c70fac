"""MkDocs hook: the home page is README.md up to its experiments, so the two cannot drift apart.

The README's links into docs/ become the site's own pages; the experiments, which link to benchmark files
outside the site, stay on the README (the site has them in benchmarks.md and recipes.md).
"""
from __future__ import annotations

import re
from pathlib import Path

END = "\n## Experiment"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    readme = (Path(config.config_file_path).parent / "README.md").read_text()
    if END not in readme:
        raise ValueError(f"docs/hooks/readme.py: README.md has no {END.strip()!r} heading to end the home page at")
    head = re.sub(r"\]\(docs/", "](", readme[: readme.index(END)])
    return head.rstrip() + "\n\n" + markdown
