#!/usr/bin/env python3
"""Lists production functions longer than --max-function lines and files longer than --max-file
lines (issue 13's yardsticks: ~80 and ~900).

    scripts/long-functions.py [--max-function 80] [--max-file 900] [paths...]

Without paths it reads the C++ sources git tracks under csi/ node/ controller/ datapath/ common/
tools/, tests (*_test.cpp, */test/*) left out. It is a brace matcher over text with comments and
literals blanked, not a parser: a function is a top-level `{...}` (outside any other function)
whose header ends like a signature: `)`, a cv/ref/noexcept/override qualifier or a trailing
return type. Lambdas and local classes count toward the function they sit in. Lines are counted
from the signature's first line to the closing brace. Exit status 0 always: it measures.
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOTS = ["csi", "node", "controller", "datapath", "common", "tools"]
EXTS = (".cpp", ".cc", ".h", ".hpp")


def production_files(repo):
    out = subprocess.run(["git", "ls-files", "--", *ROOTS], cwd=repo, check=True,
                         capture_output=True, text=True).stdout.split()
    return [f for f in out
            if f.endswith(EXTS) and not re.search(r"(_test\.(cpp|cc)$|/tests?/)", f)]


def blank(src):
    """Comments, string and char literals replaced by spaces; newlines kept so lines still count."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == 'R' and src.startswith('R"', i) and (i == 0 or not (src[i-1].isalnum() or src[i-1] == '_')):
            m = re.match(r'R"([^(\s]*)\(', src[i:])
            if not m:
                out.append(c)
                i += 1
                continue
            end = src.find(")" + m.group(1) + '"', i)
            j = n if end < 0 else end + len(m.group(1)) + 2
            out.append('""' + re.sub(r"[^\n]", " ", src[i + 2:j]))
            i = j
        elif c in "\"'":
            # A digit separator (1'000) is not a char literal.
            if c == "'" and i > 0 and src[i-1].isalnum() and i + 1 < n and src[i+1].isalnum() \
                    and not src[i-1:i].isalpha():
                out.append(" ")
                i += 1
                continue
            j = i + 1
            while j < n and src[j] != c and src[j] != "\n":
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(c + " " * (j - i - 2) + c if j - i >= 2 else c)
            i = j
        elif c == "#" and (i == 0 or src[i-1] == "\n" or src[:i].rsplit("\n", 1)[-1].strip() == ""):
            # Preprocessor line (with continuations): its braces are not code structure.
            j = i
            while True:
                k = src.find("\n", j)
                if k < 0:
                    k = n
                    break
                if src[k-1] == "\\":
                    j = k + 1
                    continue
                break
            out.append(re.sub(r"[^\n]", " ", src[i:k]))
            i = k
        else:
            out.append(c)
            i += 1
    return "".join(out)


SCOPE = re.compile(r"\b(namespace|class|struct|union|enum)\b")
CONTROL = re.compile(r"^(if|for|while|switch|catch|do|else|try)\b")
SIG_END = re.compile(r"(\)|\bconst|\bnoexcept|\boverride|\bfinal|\bmutable|&|->\s*[\w:<>,\s*&]+)\s*$")


def functions(text):
    """Yields (start_line, end_line, name) for each top-level function body."""
    depth = 0
    header_start = 0          # offset where the current header (since last ; or block end) starts
    stack = []                # per open brace: 'scope' | 'func' | 'init'
    func_open = None
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == ";" and (not stack or stack[-1] == "scope"):
            header_start = i + 1
        elif c == "{":
            if stack and stack[-1] in ("func", "inner"):
                stack.append("inner")
            else:
                header = text[header_start:i]
                h = " ".join(header.split())
                kind = "init"
                # Only what follows the last access label or template<> counts.
                h_tail = re.sub(r"^.*\b(public|private|protected)\s*:(?!:)", "", h)
                if SCOPE.search(h_tail) and "(" not in h_tail.split("{")[0] or re.match(r"^\s*(extern\s+\"\s*\")?\s*$", h_tail) and "extern" in h_tail:
                    kind = "scope"
                elif h_tail and "(" in h_tail and SIG_END.search(h_tail) and "=" not in h_tail.split("(")[0] \
                        and not CONTROL.match(h_tail.strip()):
                    kind = "func"
                elif SCOPE.search(h_tail):
                    kind = "scope"
                stack.append(kind)
                if kind == "func":
                    m = re.search(r"([~\w:]+(?:<[^()]*>)?(?:::[~\w]+)*|operator\s*\S+)\s*\(", h_tail)
                    name = m.group(1) if m else h_tail[:40]
                    # First non-blank line of the header.
                    lead = len(header) - len(header.lstrip())
                    func_open = (text.count("\n", 0, header_start + lead) + 1, name)
                if kind in ("scope",):
                    header_start = i + 1
        elif c == "}":
            kind = stack.pop() if stack else "scope"
            if kind == "func" and func_open:
                yield func_open[0], text.count("\n", 0, i) + 1, func_open[1]
                func_open = None
            if kind in ("func", "scope"):
                header_start = i + 1
        i += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-function", type=int, default=80)
    ap.add_argument("--max-file", type=int, default=900)
    ap.add_argument("paths", nargs="*")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parent.parent
    files = args.paths or production_files(repo)
    long_funcs, long_files = [], []
    for f in files:
        src = (repo / f).read_text(errors="replace")
        lines = src.count("\n")
        if lines > args.max_file:
            long_files.append((lines, f))
        for start, end, name in functions(blank(src)):
            length = end - start + 1
            if length > args.max_function:
                long_funcs.append((length, f"{f}:{start}", name))
    print(f"functions over {args.max_function} lines: {len(long_funcs)}")
    for length, where, name in sorted(long_funcs, reverse=True):
        print(f"  {length:5d}  {where}  {name}")
    print(f"files over {args.max_file} lines: {len(long_files)}")
    for lines, f in sorted(long_files, reverse=True):
        print(f"  {lines:5d}  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
