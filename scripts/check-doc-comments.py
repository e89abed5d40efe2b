#!/usr/bin/env python3
"""Lists public Swift declarations that have no `///` (or `/** */`) doc comment.

Usage: scripts/check-doc-comments.py [--exclude FILE]... [--verbose] DIR...

The .swift files under each DIR are read recursively. `--exclude FILE` leaves FILE's declarations
out of the report (the file is still read for protocols and conformances); `--verbose` also lists,
on stderr, the declarations accepted through a protocol requirement.

A declaration counts as public API when it is
  - declared `public` or `open` inside a public type, an extension, or at file scope;
  - a member of a `public extension` without an access modifier of its own;
  - a requirement of a public protocol;
  - a case of a public enum.

Attributes (`@inlinable`, `@discardableResult`, ...) may stand between the doc comment and the
declaration; nothing else may (no blank line, no `//` comment).

A member without a comment of its own is still accepted when it implements a documented
requirement of a protocol its type conforms to, because DocC shows the requirement's
documentation for it. Conformance is read from the type's declaration and its extensions
(`struct S: P`, `extension S: P`); requirements come from the protocols declared in the scanned
directories (only requirements that carry a doc comment count) and from the short table of
standard library and Foundation protocols below. Members are matched by name and argument labels.

Exit status: 0 when every public declaration is documented, 1 otherwise (one
`FILE:LINE: declaration` line per missing comment), 2 on bad usage.
"""

import os
import re
import sys

# Requirements of protocols from other modules whose documentation DocC shows for conformers.
EXTERNAL_REQUIREMENTS = {
    "CustomStringConvertible": {"description"},
    "CustomDebugStringConvertible": {"debugDescription"},
    "LocalizedError": {"errorDescription", "failureReason", "recoverySuggestion", "helpAnchor"},
    "Equatable": {"==(_:_:)"},
    "Hashable": {"hash(into:)", "==(_:_:)"},
    "Comparable": {"<(_:_:)", "==(_:_:)"},
    "Identifiable": {"id"},
    "Encodable": {"encode(to:)"},
    "Decodable": {"init(from:)"},
    "Codable": {"encode(to:)", "init(from:)"},
    "Sequence": {"makeIterator()"},
    "IteratorProtocol": {"next()"},
    "RandomNumberGenerator": {"next()"},
    "RawRepresentable": {"rawValue", "init(rawValue:)"},
}

TYPE_KEYWORDS = {"struct", "class", "enum", "actor", "protocol", "extension"}
DECL_KEYWORDS = TYPE_KEYWORDS | {
    "func", "var", "let", "init", "deinit", "subscript", "typealias", "associatedtype", "case",
    "macro", "operator", "precedencegroup",
}
MODIFIERS = {
    "public", "open", "private", "fileprivate", "internal", "package", "static", "class", "final",
    "override", "mutating", "nonmutating", "nonisolated", "convenience", "required", "lazy",
    "weak", "unowned", "indirect", "dynamic", "optional", "consuming", "borrowing", "distributed",
    "isolated", "prefix", "postfix", "infix",
}
ACCESS = {"public", "open", "private", "fileprivate", "internal", "package"}


def strip_code(text):
    """Returns `text` with comments and string-literal contents blanked (newlines kept), so that
    braces and keywords can be found by position."""
    out = list(text)
    i, n = 0, len(text)
    # Stack of contexts: "code" (with the paren depth of a string interpolation) or strings.
    stack = [["code", 0]]

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        top = stack[-1]
        c = text[i]
        if top[0] == "code":
            if text.startswith("//", i):
                j = text.find("\n", i)
                j = n if j < 0 else j
                blank(i, j)
                i = j
            elif text.startswith("/*", i):
                depth, j = 1, i + 2
                while j < n and depth:
                    if text.startswith("/*", j):
                        depth, j = depth + 1, j + 2
                    elif text.startswith("*/", j):
                        depth, j = depth - 1, j + 2
                    else:
                        j += 1
                blank(i, j)
                i = j
            else:
                m = re.match(r'(#*)("""|")', text[i:i + 12])
                if m and (m.group(1) == "" or c == "#"):
                    hashes, quote = m.group(1), m.group(2)
                    stack.append(["string", quote, hashes])
                    i += len(m.group(0))
                elif c == "(" and len(stack) > 1:
                    top[1] += 1
                    i += 1
                elif c == ")" and len(stack) > 1:
                    if top[1] == 0:
                        stack.pop()  # end of an interpolation
                        blank(i, i + 1)
                    else:
                        top[1] -= 1
                    i += 1
                else:
                    i += 1
        else:
            _, quote, hashes = top
            escape = "\\" + hashes
            if text.startswith(escape + "(", i):
                blank(i, i + len(escape) + 1)
                i += len(escape) + 1
                stack.append(["code", 0])
            elif text.startswith(escape, i) and i + len(escape) < n:
                blank(i, i + len(escape) + 1)
                i += len(escape) + 1
            elif text.startswith(quote + hashes, i):
                stack.pop()
                i += len(quote) + len(hashes)
            else:
                blank(i, i + 1)
                i += 1
    return "".join(out)


def parse_head(code):
    """Splits a declaration's first line into (attributes removed) modifiers, keyword, rest.
    Returns None when the line does not start a declaration."""
    s = code.strip()
    while s.startswith("@"):
        m = re.match(r"@[\w.]+(\s*\((?:[^()]|\([^()]*\))*\))?\s*", s)
        if not m:
            break
        s = s[m.end():]
    mods = []
    while True:
        m = re.match(r"(\w+)(\s*\(\s*set\s*\))?\s+", s)
        if not m or m.group(1) not in MODIFIERS:
            break
        # `class func` / `class var` are modifiers; `class Name` is a declaration.
        if m.group(1) == "class" and not re.match(r"class\s+(func|var|let|subscript|override|final)\b", s):
            break
        mods.append(m.group(1) + ("(set)" if m.group(2) else ""))
        s = s[m.end():]
    m = re.match(r"(\w+)\b", s)
    if not m or m.group(1) not in DECL_KEYWORDS:
        return None
    return mods, m.group(1), s[m.end():].strip()


def member_key(keyword, rest, following):
    """The name used to match a member against a protocol requirement: `name`, or
    `name(label:label:)` for functions, initializers and subscripts."""
    if keyword in ("var", "let", "typealias", "associatedtype", "case"):
        m = re.match(r"`?(\w+)", rest)
        return m.group(1) if m else None
    if keyword == "func":
        m = re.match(r"`?(\w+|[^\s\w(`]+)`?", rest)
        name = m.group(1) if m else "?"
        operator = not re.match(r"\w", name)
    elif keyword in ("init", "subscript"):
        name, operator = keyword, False
        rest = rest.lstrip("?!")
    else:
        return None
    sig = rest + " " + following
    start = sig.find("(")
    if start < 0:
        return name
    depth, j = 0, start
    while j < len(sig):
        if sig[j] in "([":
            depth += 1
        elif sig[j] in ")]":
            depth -= 1
            if depth == 0:
                break
        j += 1
    params, depth, cur = [], 0, ""
    for ch in sig[start + 1:j]:
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        if ch == "," and depth == 0:
            params.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        params.append(cur)
    labels = []
    for p in params:
        head = p.split(":")[0].split()
        labels.append(("_" if operator or not head else head[0]) + ":")
    return f"{name}({''.join(labels)})"


def inheritance(header):
    """Names after the `:` of a type or extension header (generic arguments and `where` dropped)."""
    header = re.sub(r"\bwhere\b.*", "", header)
    depth, out = 0, ""
    for ch in header:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out += ch
    if ":" not in out:
        return []
    return [n.strip().split(".")[-1] for n in out.split(":", 1)[1].split(",") if n.strip()]


def type_name(keyword, rest):
    m = re.match(r"([\w.]+)", rest)
    return m.group(1) if m else "?"


class Decl:
    def __init__(self, path, line, text, owner, key, documented, api, requirement):
        self.path, self.line, self.text = path, line, text
        self.requirement = requirement  # declared in a protocol's body
        self.owner, self.key, self.documented, self.api = owner, key, documented, api


def has_doc_comment(lines, i):
    """Whether line i (0-based) is preceded by a doc comment, skipping attribute lines."""
    j = i - 1
    while j >= 0:
        s = lines[j].strip()
        if s.startswith("@") and not s.startswith("@*"):
            j -= 1
            continue
        break
    if j < 0:
        return False
    s = lines[j].strip()
    if s.startswith("///"):
        return True
    if s.endswith("*/"):
        k = j
        while k >= 0 and "/*" not in lines[k]:
            k -= 1
        return k >= 0 and lines[k].strip().startswith("/**")
    return False


def scan_file(path, public_types):
    """Yields the declarations of one file, each marked as public API or not."""
    text = open(path, encoding="utf-8").read()
    lines = text.split("\n")
    code_lines = strip_code(text).split("\n")

    # A scope is a dict: kind ("file", "type", "body"), keyword, name (qualified), public (whether
    # members can be API), default_public (members without an access modifier are public).
    stack = [{"kind": "file", "keyword": None, "name": "", "public": True, "default_public": False}]
    pending = None  # a type or extension header waiting for its `{`
    paren = 0
    decls = []
    for i, code in enumerate(code_lines):
        scope = stack[-1]
        at_member_level = scope["kind"] in ("file", "type") and paren == 0 and pending is None
        head = parse_head(code) if at_member_level else None
        if head:
            mods, keyword, rest = head
            access = next((m for m in mods if m in ACCESS), None)
            owner = scope["name"]
            if scope["keyword"] == "protocol":
                api = scope["public"]
            elif keyword == "case" and scope["keyword"] == "enum":
                api = scope["public"]
            elif access in ("public", "open"):
                api = scope["public"]
            elif access is None and scope["default_public"]:
                api = True
            else:
                api = False
            following = " ".join(code_lines[i + 1:i + 12])
            key = member_key(keyword, rest, following)
            if keyword in TYPE_KEYWORDS:
                name = type_name(keyword, rest)
                if keyword == "extension":
                    qualified = name
                    # Members written `public` inside an extension are public unless the extended
                    # type is one of this module's non-public types.
                    ext_public = public_types.get(name, True)
                    pending = {"kind": "type", "keyword": keyword, "name": qualified,
                               "public": ext_public, "default_public": access == "public",
                               "header": code[code.find(keyword):], "line": i}
                else:
                    qualified = f"{owner}.{name}" if owner else name
                    pending = {"kind": "type", "keyword": keyword, "name": qualified,
                               "public": api, "default_public": False, "header": code[code.find(keyword):], "line": i}
            if keyword != "extension" and keyword != "deinit":
                decls.append(Decl(path, i + 1, lines[i].strip(), owner, key,
                                  has_doc_comment(lines, i), api, scope["keyword"] == "protocol"))
        elif pending is not None and i != pending["line"]:
            pending["header"] += " " + code.strip()

        # Track braces and parentheses on this line.
        for ch in code:
            if ch in "([":
                paren += 1
            elif ch in ")]":
                paren -= 1
            elif ch == "{":
                if pending is not None and paren == 0:
                    pending["conformances"] = inheritance(pending["header"].split("{")[0])
                    stack.append(pending)
                    yield ("scope", pending)
                    pending = None
                else:
                    stack.append({"kind": "body", "keyword": None, "name": stack[-1]["name"],
                                  "public": False, "default_public": False})
            elif ch == "}":
                if len(stack) > 1:
                    stack.pop()
    for d in decls:
        yield ("decl", d)


def swift_files(root):
    if os.path.isfile(root):
        return [root] if root.endswith(".swift") else []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if f.endswith(".swift"):
                found.append(os.path.join(dirpath, f))
    return found


def check(roots, excluded):
    files = [f for root in roots for f in swift_files(root)]
    # Pass 1: which of the module's types are public (extensions of them may declare public API).
    public_types = {}
    for path in files:
        for kind, item in scan_file(path, {}):
            if kind == "scope" and item["keyword"] != "extension":
                public_types[item["name"]] = item["public"]
    # Pass 2: declarations, conformances and documented protocol requirements.
    decls, conformances, requirements, refinements = [], {}, {}, {}
    for path in files:
        for kind, item in scan_file(path, public_types):
            if kind == "scope":
                conformances.setdefault(item["name"], set()).update(item["conformances"])
                if item["keyword"] == "protocol":
                    requirements.setdefault(item["name"], set())
                    refinements[item["name"]] = set(item["conformances"])
            else:
                decls.append(item)
    for d in decls:
        if d.requirement and d.documented and d.key:
            requirements[d.owner].add(d.key)

    def inherited_requirements(type_name):
        names, seen = set(), set()
        todo = list(conformances.get(type_name, ()))
        if type_name in requirements:
            todo.append(type_name)  # a protocol extension's defaults implement its requirements
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            names |= requirements.get(p, set()) | EXTERNAL_REQUIREMENTS.get(p, set())
            todo.extend(refinements.get(p, ()))
        return names

    api = [d for d in decls if d.api and os.path.normpath(d.path) not in excluded]
    missing, inherited = [], []
    for d in api:
        if d.documented:
            continue
        if not d.requirement and d.key and d.key in inherited_requirements(d.owner):
            inherited.append(d)
        else:
            missing.append(d)
    return api, missing, inherited


def main(argv):
    roots, excluded, verbose = [], set(), False
    args = iter(argv)
    for a in args:
        if a == "--exclude":
            excluded.add(os.path.normpath(next(args, "")))
        elif a == "--verbose":
            verbose = True
        elif a.startswith("-"):
            print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
            return 2
        else:
            roots.append(a)
    if not roots:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    api, all_missing, all_inherited = check(roots, excluded)
    total = len(api)
    for d in all_missing:
        print(f"{d.path}:{d.line}: {d.text}")
    if verbose:
        for d in all_inherited:
            print(f"{d.path}:{d.line}: (inherits {d.key}) {d.text}", file=sys.stderr)
    inherited = f"{len(all_inherited)} of them through the protocol requirement they implement"
    if all_missing:
        print(f"{len(all_missing)} of {total} public declarations lack a doc comment "
              f"({total - len(all_missing)} documented, {inherited})", file=sys.stderr)
        return 1
    print(f"All {total} public declarations are documented ({inherited})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
