"""MkDocs hook: the docstrings' Sphinx roles (``:func:`corda_kernels.apply```) as links.

The package's docstrings use Sphinx cross-reference roles, which read well in ``help()``; Markdown
renders them as ``:func:<code>x</code>``. This turns each into an autorefs reference (a link where
the target is rendered on the site, plain code otherwise; a bare name is looked up among the
package's public names); ``~`` shows the last component only.
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):<code>(~?)([\w.]+)(\(\))?</code>")


def _reference(match: re.Match) -> str:
    short, target, call = match.group(1), match.group(2), match.group(3) or ""
    shown = (target.rsplit(".", 1)[-1] if short else target) + call
    if "." not in target:  # a bare name: a link when it is a public name of the package
        target = f"corda_kernels.{target}"
    return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(_reference, html)
