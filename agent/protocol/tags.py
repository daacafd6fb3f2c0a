"""Device tags: short labels a device reports (``fleet.tags``) for controllers to group by.

One rule for both ends: the agent refuses a bad tag in its config, and the
controller ignores a bad one in a report (a device's report is not trusted to
be well formed). A tag names a group as ``tag:<tag>`` on the controller, in
config files and on command lines, so it keeps to characters that need no
quoting and no ``:``.
"""

from __future__ import annotations

import re
from typing import Final

# For JSON schemas too (jsonschema searches): \Z, since '$' accepts a trailing newline.
TAG_BODY: Final = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}"
TAG_PATTERN: Final = rf"^{TAG_BODY}\Z"
MAX_TAGS: Final = 16
_TAG: Final = re.compile(TAG_PATTERN)


def is_tag(value: object) -> bool:
    """1-32 letters, digits, '_', '.' or '-', starting with a letter or digit."""
    return isinstance(value, str) and _TAG.fullmatch(value) is not None


def reported_tags(value: object) -> tuple[str, ...]:
    """The valid tags of a reported ``tags`` field, sorted and unique (at most
    ``MAX_TAGS``); anything else in it is dropped."""
    if not isinstance(value, list):
        return ()
    return tuple(sorted({t for t in value if is_tag(t)}))[:MAX_TAGS]
