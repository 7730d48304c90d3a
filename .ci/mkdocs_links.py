"""mkdocs hook: the docs pages also link to files of the repository outside docs/ (examples,
results), which the site cannot serve; mkdocs' own link check is relaxed to 'info' for those
(mkdocs.yml), so this hook fails the build on any other relative link whose target is missing."""

from __future__ import annotations

import posixpath
import re

from mkdocs.exceptions import PluginError

LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(page.file.src_uri)
    for match in LINK.finditer(markdown):
        target = match.group(1)
        if re.match(r"^[a-z]+:", target) or target.startswith(("../", "/")):
            continue
        path = posixpath.normpath(posixpath.join(here, target))
        if files.get_file_from_path(path) is None:
            raise PluginError(f"{page.file.src_uri}: broken link to {target!r}")
    return markdown
