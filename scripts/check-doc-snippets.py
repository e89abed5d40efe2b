#!/usr/bin/env python3
"""Checks that the Swift blocks of the DocC articles are the code the example package compiles.

Usage: scripts/check-doc-snippets.py FILE.md...

A fenced ```swift block preceded by an HTML comment naming a file (`<!-- PATH -->`, relative to
the repository root) must appear in that file: its non-blank lines, with leading and trailing
whitespace ignored, as consecutive non-blank lines of the file. Blocks without such a comment
are not checked (a package manifest line, a config). Exit status 0 when every named block
matches, 1 otherwise (one `ARTICLE:LINE: ...` line per block that does not), 2 on bad usage.
"""

import os
import re
import sys


def lines(text):
    return [l.strip() for l in text.split("\n") if l.strip()]


def contains(haystack, needle):
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def main(argv):
    if not argv:
        print(__doc__.strip().split("\n")[2], file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    failures = 0
    checked = 0
    for article in argv:
        text = open(article, encoding="utf-8").read()
        for m in re.finditer(r"<!--\s*(\S+)\s*-->\s*\n```swift\n(.*?)\n```", text, re.S):
            line = text.count("\n", 0, m.start()) + 1
            path = os.path.join(root, m.group(1))
            if not os.path.isfile(path):
                print(f"{article}:{line}: {m.group(1)} does not exist")
                failures += 1
                continue
            checked += 1
            if not contains(lines(open(path, encoding="utf-8").read()), lines(m.group(2))):
                print(f"{article}:{line}: this block is not in {m.group(1)} any more; copy the code again")
                failures += 1
    if checked == 0 and failures == 0:
        print("check-doc-snippets: no block names a file", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
