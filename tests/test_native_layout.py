"""The native code's layout (issue 11): the interposer's files call only
downward, no file is longer than 800 lines, no function longer than 100
without a reason next to it. Read from the source as text."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, "native")
PRELOAD = os.path.join(NATIVE, "preload")
MAX_LINES = 800
MAX_FUNCTION = 100

# native/preload/ from the top down (docs/ARCHITECTURE.md, "The interposer"):
# a file may include the header of a file below it, never one above it or
# beside it, so calls go one way only.
LEVELS = {
    "hooks": 9,
    "splice": 8.5,  # sendfile/splice: io.c's rules, shared through io.h
    "sockets": 8.3,
    "standin": 8.2,  # a closed peer's final bytes for exec: reads them with io.c
    "io": 8, "poll": 8, "epoll": 8,
    "ready": 7, "wait": 7,
    "fdclass": 6,
    "revert": 5.5,  # back to TCP: answers and requests through the block header
    "epset": 5,
    "control": 4,
    "testhooks": 3.5,
    "channel": 3,
    "orphan": 2.8,  # a shared socket's block, given up once nobody holds the socket
    "memory": 2.6,  # where a connection's memory comes from: checks offers with ask_info
    "ask": 2.3,     # the SOL_SHMBYPASS socket options
    "setup": 2,
    "fdtable": 1,
    "capture": 0.5,  # includes nothing of the interposer: anything may call it
}


# Includes that go upward today, each a strict xfail naming the call that
# needs moving down (the test passes, and so fails here, once it is gone).
UPWARD: dict[str, str] = {}


def sources(top):
    for d, _, files in os.walk(top):
        for f in sorted(files):
            if f.endswith((".c", ".h")):
                yield os.path.join(d, f)


def test_every_preload_file_has_a_level():
    names = {f.rsplit(".", 1)[0] for f in os.listdir(PRELOAD) if f.endswith((".c", ".h"))}
    assert names == set(LEVELS), names ^ set(LEVELS)


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=UPWARD[os.path.basename(p)]))
    if os.path.basename(p) in UPWARD else p for p in sorted(sources(PRELOAD))],
    ids=os.path.basename)
def test_preload_includes_only_lower_files(path):
    me = os.path.basename(path).rsplit(".", 1)[0]
    with open(path) as f:
        included = re.findall(r'^#include "([a-z_]+)\.h"', f.read(), re.M)
    upward = [h for h in included if h in LEVELS and h != me and LEVELS[h] >= LEVELS[me]]
    assert not upward, f"{me} (level {LEVELS[me]}) includes {upward}: calls must go downward"


def test_first_comment_says_what_the_file_owns():
    for path in sources(PRELOAD):
        with open(path) as f:
            head = f.read(400)
        name = os.path.basename(path)
        assert f"{name}: " in head, f"{path}: the first comment starts with '{name}: what it owns'"


def functions(text):
    """(name, first line, length) of each top-level function in kernel style:
    a signature at column 0, its body up to the closing brace at column 0."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line == "{" and i and re.search(r"\w+\(", lines[i - 1] + " ".join(lines[max(0, i - 3):i])):
            j = next(k for k in range(i, len(lines)) if lines[k] == "}")
            start = i - 1
            while start > 0 and lines[start - 1].strip() and not lines[start - 1].startswith(("}", "/", " *", "#")):
                start -= 1
            name = re.findall(r"(\w+)\(", " ".join(lines[start:i]))
            yield (name[0] if name else "?"), start + 1, j - start + 1


@pytest.mark.parametrize("path", sorted(sources(NATIVE)) + sorted(sources(os.path.join(ROOT, "bpf"))),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_no_long_file_or_function(path):
    with open(path) as f:
        text = f.read()
    assert text.count("\n") <= MAX_LINES, f"{path}: {text.count(chr(10))} lines"
    lines = text.split("\n")
    for name, first, length in functions(text):
        above = " ".join(lines[max(0, first - 4):first - 1])
        assert length <= MAX_FUNCTION or "long:" in above, (
            f"{path}:{first}: {name} is {length} lines (say why next to it: /* long: ... */)")


def code_only(text):
    """C source without comments and string literals."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def test_the_library_never_calls_its_own_hooks():
    """The interposer's own I/O is raw system calls or REAL(): a libc call
    from inside the library lands in its own exported hook (a call back up,
    and our fds taken for the application's). Found twice: the inbox's
    sendmsg/recvmsg and memory.c's fcntl."""
    with open(os.path.join(PRELOAD, "hooks.c")) as f:
        hooked = set(re.findall(r"^EXPORT [^(]*?\b(\w+)\(", f.read(), re.M))
    assert {"sendmsg", "recvmsg", "fcntl", "close"} <= hooked
    linked = [p for p in sources(PRELOAD) if p.endswith(".c") and not p.endswith("hooks.c")]
    linked += [os.path.join(NATIVE, f) for f in ("inbox.c", "pairmem.c", "stream.c", "ring.c",
                                                  "ring_wait.c", "region.c")]
    for path in linked:
        with open(path) as f:
            code = code_only(f.read())
        calls = {m.group(1) for m in re.finditer(r"(?<![\w.>])(\w+)\s*\(", code)} & hooked
        assert not calls, f"{path} calls its own hooks {sorted(calls)}: use syscall() or REAL()"
