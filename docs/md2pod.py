#!/usr/bin/env python3
# cbw — docs/md2pod.py: the Markdown man pages (docs/NAME.SECTION.md) as POD,
# so that every man page is built by one rule: pod2man (docs/CMakeLists.txt).
#
#   md2pod.py INPUT.md OUTPUT.pod
#
# It understands the subset the man pages use and fails on nothing: a first
# line "# name(S) — what" (becomes NAME unless the page has its own ## NAME),
# ## / ### headings, paragraphs, definition lists ("term" then ": text"),
# "* " / "- " / "1. " lists, indented and fenced code blocks, pipe tables
# (rendered as aligned text) and the inline `code`, **bold**, *italic* and
# [text](link) spans.  test_md2pod.py checks that no word of a page is lost.
import re
import sys
import textwrap


def escape(text):
    """Plain text to POD: < and > as entities (no accidental X<...> codes)."""
    return re.sub(r"[<>]", lambda m: "E<lt>" if m.group(0) == "<" else "E<gt>", text)


def inline(text):
    """Markdown inline spans to POD formatting codes."""
    out = []
    pos = 0
    # code spans first: nothing inside them is markup
    for m in re.finditer(r"(`+)(.+?)\1", text):
        out.append(spans(text[pos:m.start()]))
        code = escape(m.group(2).strip()) if m.group(1) != "`" else escape(m.group(2))
        out.append("C<%s>" % code if code else "")
        pos = m.end()
    out.append(spans(text[pos:]))
    return "".join(out)


def spans(text):
    text = escape(text)
    text = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"\1 (\2)", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"B<\1>", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"I<\1>", text)
    text = re.sub(r"(?<![\w])_(?!\s)([^_]+?)(?<!\s)_(?![\w])", r"I<\1>", text)
    return text


def indent_of(line):
    return len(line) - len(line.lstrip(" "))


def table(rows):
    """A pipe table as a verbatim block: columns aligned, markup stripped."""
    cells = []
    for r in rows:
        r = r.strip()
        if r.startswith("|"):
            r = r[1:]
        if r.endswith("|"):
            r = r[:-1]
        c = [x.strip().replace("`", "") for x in r.split("|")]
        if all(re.fullmatch(r":?-{3,}:?", x) for x in c if x):
            continue                       # the |---|---| separator
        cells.append(c)
    widths = [0] * max(len(c) for c in cells)
    for c in cells:
        for i, x in enumerate(c):
            widths[i] = max(widths[i], len(x))
    # The last column wraps so that a row fits a 72-column verbatim block.
    lead = sum(w + 2 for w in widths[:-1])
    widths[-1] = max(20, min(widths[-1], 72 - lead))
    lines = []
    for n, c in enumerate(cells):
        c = c + [""] * (len(widths) - len(c))
        last = textwrap.wrap(c[-1], widths[-1]) or [""]
        for k, part in enumerate(last):
            head = c[:-1] if k == 0 else [""] * (len(c) - 1)
            row = [x.ljust(widths[i]) for i, x in enumerate(head)] + [part]
            lines.append(" " + "  ".join(row).rstrip())
        if n == 0:
            lines.append(" " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Converter:
    def __init__(self, lines):
        self.lines = lines
        self.i = 0
        self.out = []
        self.open_list = None          # None, "dl", "ul", "ol"

    def emit(self, block):
        self.out.append(block)

    def close_list(self):
        if self.open_list:
            self.emit("=back")
            self.open_list = None

    def open(self, kind):
        if self.open_list != kind:
            self.close_list()
            self.emit("=over 4")
            self.open_list = kind

    def peek(self, k=0):
        j = self.i + k
        return self.lines[j] if j < len(self.lines) else None

    def body(self, first, ind):
        """The text of a list item or definition: FIRST, then the lines
        indented by at least IND (blank lines in between allowed), as POD
        paragraphs; deeper-indented runs are code."""
        paras = [[first]] if first.strip() else []
        while True:
            line = self.peek()
            if line is None:
                break
            if line.strip() == "":
                nxt = self.peek(1)
                # the item goes on after a blank line only if indented
                k = 1
                while nxt is not None and nxt.strip() == "":
                    k += 1
                    nxt = self.peek(k)
                if nxt is None or indent_of(nxt) < ind:
                    break
                self.i += k
                paras.append([])
                continue
            if indent_of(line) < ind:
                break
            if not paras:
                paras.append([])
            paras[-1].append(line[ind:])
            self.i += 1
        for p in paras:
            if not p:
                continue
            if all(indent_of(x) >= 4 or not x.strip() for x in p):
                self.emit("\n".join(" " + x for x in p))      # code inside the item
            else:
                self.emit(inline(" ".join(x.strip() for x in p)))

    def run(self):
        title = self.lines[0] if self.lines else ""
        m = re.match(r"#\s+(\S+?)\((\d)\)\s*(?:—|-)\s*(.*)", title)
        if not m:
            raise SystemExit("md2pod: the first line must be '# name(S) — what it is'")
        self.i = 1
        has_name = any(re.match(r"##\s+NAME\s*$", x) for x in self.lines)
        self.emit("=encoding UTF-8")
        if not has_name:
            self.emit("=head1 NAME")
            self.emit("%s - %s" % (m.group(1), inline(m.group(3))))
        section = None
        while self.i < len(self.lines):
            line = self.lines[self.i]
            s = line.strip()
            if s == "":
                self.i += 1
                continue
            h = re.match(r"(#{2,4})\s+(.*?)\s*#*$", line)
            if h:
                self.close_list()
                section = h.group(2)
                level = len(h.group(1)) - 1
                self.emit("=head%d %s" % (level, inline(section)))
                self.i += 1
                continue
            if s.startswith("```"):
                self.close_list()
                self.i += 1
                code = []
                while self.i < len(self.lines) and not self.lines[self.i].strip().startswith("```"):
                    code.append(self.lines[self.i])
                    self.i += 1
                self.i += 1
                ind = min((indent_of(x) for x in code if x.strip()), default=0)
                self.emit("\n".join("    " + x[ind:] if x.strip() else "" for x in code))
                continue
            if indent_of(line) >= 4:
                self.close_list()
                code = []
                while self.i < len(self.lines):
                    x = self.lines[self.i]
                    if x.strip() and indent_of(x) < 4:
                        break
                    if not x.strip():
                        nxt = next((y for y in self.lines[self.i:] if y.strip()), None)
                        if nxt is None or indent_of(nxt) < 4:
                            break
                    code.append(x)
                    self.i += 1
                self.emit("\n".join(code).rstrip())
                continue
            if s.startswith("|"):
                self.close_list()
                rows = []
                while self.i < len(self.lines) and self.lines[self.i].strip().startswith("|"):
                    rows.append(self.lines[self.i])
                    self.i += 1
                self.emit(table(rows))
                continue
            li = re.match(r"(\s*)([*-]|\d+\.)\s+(.*)", line)
            if li and not s.startswith("**"):
                kind = "ol" if li.group(2)[0].isdigit() else "ul"
                self.open(kind)
                self.emit("=item %s" % (li.group(2) if kind == "ol" else "*"))
                self.i += 1
                self.body(li.group(3), indent_of(line) + 2)
                continue
            # A paragraph; it is a definition term when the line after its
            # last line starts with ':'.
            para = []
            while self.i < len(self.lines):
                x = self.lines[self.i]
                if not x.strip() or x.startswith(":") or re.match(r"#{2,4}\s", x):
                    break
                if para and (x.strip().startswith("|") or re.match(r"\s*([*-]|\d+\.)\s", x)):
                    break
                para.append(x.strip())
                self.i += 1
            nxt = self.peek()
            if nxt is not None and nxt.startswith(":"):
                self.open("dl")
                self.emit("=item " + inline(" ".join(para)))
                d = re.match(r":\s*", nxt)
                self.i += 1
                self.body(nxt[d.end():], d.end())
                continue
            self.close_list()
            text = " ".join(para)
            if section == "NAME":
                text = text.replace(" — ", " - ")
            self.emit(inline(text))
        self.close_list()
        self.emit("=cut")
        return "\n\n".join(self.out) + "\n"


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: md2pod.py INPUT.md OUTPUT.pod")
    with open(sys.argv[1], encoding="utf-8") as f:
        lines = f.read().splitlines()
    pod = Converter(lines).run()
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(pod)


if __name__ == "__main__":
    main()
