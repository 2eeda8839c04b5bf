#!/usr/bin/env python3
# cbw — docs/tests/test_md2pod.py: md2pod.py keeps every word of the man
# pages and renders each construct as POD.
#
#   test_md2pod.py MD2POD PAGE.md...
#
# 1. A fixture with every construct the converter knows: the POD passes
#    podchecker -warnings and has the expected commands (headings, items,
#    verbatim blocks, formatting codes, escaped angle brackets).
# 2. Each real page: podchecker -warnings is clean, and every word of the
#    Markdown appears in pod2text's rendering at least as often (a dropped
#    paragraph, item or table row fails), and the NAME line is whatis-ready.
import collections
import os
import re
import subprocess
import sys
import tempfile

FIXTURE = """# tool(1) — does a <thing>

## SYNOPSIS

    tool [--opt X] FILE

## DESCRIPTION

Plain text with `code <x>`, **bold**, *italic*, a [link](docs/x.md) and a<b.

### Sub heading

`--opt X`
: the option, on
  two lines.

  A second paragraph of it.

`--other`
:   another one.

* first bullet
  continued
* second bullet

1. one
2. two

| col | meaning |
|---|---|
| 0 | zero, a long meaning |

```json
{"a": 1}
```

Last paragraph.
"""

EXPECT = [
    "=head1 NAME\n\ntool - does a E<lt>thingE<gt>",
    "=head1 SYNOPSIS\n\n    tool [--opt X] FILE",
    "C<code E<lt>xE<gt>>, B<bold>, I<italic>, a link (docs/x.md) and aE<lt>b.",
    "=head2 Sub heading",
    "=over 4\n\n=item C<--opt X>\n\nthe option, on two lines.\n\nA second paragraph of it.\n\n"
    "=item C<--other>\n\nanother one.\n\n=back",
    "=item *\n\nfirst bullet continued\n\n=item *\n\nsecond bullet\n\n=back",
    "=item 1.\n\none\n\n=item 2.\n\ntwo\n\n=back",
    " col  meaning\n ---  ",
    "    {\"a\": 1}",
    "Last paragraph.\n\n=cut",
]


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def convert(md2pod, src, dst):
    run(sys.executable, md2pod, src, dst)
    r = subprocess.run(["podchecker", "-warnings", dst], capture_output=True, text=True)
    if r.returncode != 0 or "WARNING" in r.stderr or "ERROR" in r.stderr:
        sys.exit("FAIL: podchecker on %s: %s" % (dst, r.stderr))
    with open(dst, encoding="utf-8") as f:
        return f.read()


def words(text):
    return collections.Counter(re.findall(r"[A-Za-z0-9]+", text))


def main():
    md2pod, pages = sys.argv[1], sys.argv[2:]
    failed = 0
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "tool.1.md")
        with open(src, "w") as f:
            f.write(FIXTURE)
        pod = convert(md2pod, src, os.path.join(d, "tool.1.pod"))
        for e in EXPECT:
            if e not in pod:
                print("FAIL: fixture: expected in the POD:\n%s\n--- got:\n%s" % (e, pod))
                failed += 1
        for page in pages:
            out = os.path.join(d, os.path.basename(page)[:-3] + ".pod")
            pod = convert(md2pod, page, out)
            text = run("pod2text", "-w", "200", out).stdout
            with open(page, encoding="utf-8") as f:
                md = f.read()
            # the title line "# name(S) — what" becomes NAME (or the header)
            want, got = words(md.split("\n", 1)[1]), words(text)
            lost = {w: n - got[w] for w, n in want.items() if got[w] < n}
            if lost:
                print("FAIL: %s: words lost in the POD: %s" % (page, lost))
                failed += 1
                continue
            name = re.search(r"^NAME\n\s+(\S+) - \S", text, re.M)
            if not name:
                print("FAIL: %s: no 'name - description' NAME section" % page)
                failed += 1
            else:
                print("ok: %s (%d words)" % (page, sum(want.values())))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
