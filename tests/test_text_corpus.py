"""Web and math text: WARC pages extracted as datatrove does, datatrove's natural-language quality filters in a
``--kind text`` build, jsonl/parquet text records keeping their url, and the readers a recall pool uses."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dscoder.cli import main
from dscoder.data.pipeline import BuildConfig, build
from dscoder.data.text import TextFilters, iter_records, iter_warc

PROSE = [
    "The derivative of a function measures how quickly its value changes as the input changes. For a polynomial, "
    "the power rule gives the derivative term by term. The result is again a polynomial of lower degree. The chain "
    "rule handles a function of a function. The product rule handles a product of two functions. Together these "
    "rules differentiate every elementary function you will meet in a first course.",
    "An integral adds up infinitely many small pieces of a quantity. The fundamental theorem of calculus links "
    "the two main ideas of the subject. Integration undoes differentiation, and the reverse holds as well. So the "
    "area under a curve can be found from any antiderivative of the function. Substitution and integration by parts "
    "are the two methods used most often in practice.",
    "A prime number has exactly two divisors, one and itself. Euclid proved that there are infinitely many of them. "
    "He assumed a finite list of all the primes. Then he built a number that no prime on the list divides. That "
    "number has a prime factor missing from the list, which is a contradiction. The argument is still taught today.",
    "Linear algebra studies vectors and the maps between them. A matrix represents such a map once a basis is "
    "chosen. Its determinant tells whether the map can be undone by another one. Eigenvectors are the directions "
    "that the map only stretches. They make many problems about repeated maps easy to solve. Much of applied "
    "mathematics rests on these ideas.",
]
JUNK = "buy now " * 60  # one repeated phrase: Gopher's repetition filter drops it


def page(title: str, body: str) -> bytes:
    paragraphs = "".join(f"<p>{s}</p>" for s in body.split("\n"))
    return (f"<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> | <a href='/about'>About</a>"
            f"</nav><article><h1>{title}</h1>{paragraphs}</article><footer>Contact us</footer></body></html>"
            ).encode()


def write_warc(path, pages):
    """``pages``: (url, content type, payload bytes); a request record precedes each response, as in a crawl."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=path.name.endswith(".gz"))
        for url, ctype, payload in pages:
            req = StatusAndHeaders("GET / HTTP/1.1", [("Host", url.split("/")[2])], is_http_request=True)
            writer.write_record(writer.create_warc_record(url, "request", http_headers=req))
            http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=io.BytesIO(payload), http_headers=http,
                                               warc_headers_dict={"WARC-Identified-Payload-Type": ctype})
            writer.write_record(record)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    warc = root / "crawl.warc.gz"
    write_warc(warc, [
        ("https://math.example.org/derivative", "text/html", page("Derivatives", PROSE[0])),
        ("https://math.example.org/integral", "text/html", page("Integrals", PROSE[1])),
        ("https://shop.example.com/deal", "text/html", page("Deal", JUNK)),
        ("https://img.example.com/a.png", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(64)),
    ])
    jsonl = root / "pages.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"j{i}", "url": f"https://notes.example.net/{i}", "text": t}) + "\n"
                             for i, t in enumerate([PROSE[2], JUNK])))
    parquet = root / "pages.parquet"
    pq.write_table(pa.table({"id": ["p0"], "url": ["https://la.example.edu/m"], "text": [PROSE[3]]}), parquet)
    return root, warc, jsonl, parquet


def test_warc_records_extracted_as_datatrove_does(web):
    _, warc, _, _ = web
    rows = list(iter_warc(warc))
    assert [n for n, _, _ in rows] == [0, 1, 2, 3]  # requests are not documents
    first = rows[0][1]
    assert first["url"] == "https://math.example.org/derivative" and first["id"].startswith("<urn:uuid:")
    assert "power rule" in first["text"] and "Home" not in first["text"]  # navigation dropped by Trafilatura
    assert rows[3] == (3, None, "not_html")


def test_filters_name_the_datatrove_rule():
    filters = TextFilters()
    assert filters.check(PROSE[0] + "\n" + PROSE[1])[0] is None
    rule, _ = filters.check(JUNK)
    assert rule is not None and rule.startswith("gopher_repetition:")
    assert TextFilters(["fineweb_quality"]).filters[0][0] == "fineweb_quality"


def test_text_build_from_warc_jsonl_and_parquet(web, tmp_path):
    root, warc, jsonl, parquet = web
    tok = tmp_path / "tok"
    from dscoder.tokenizer import Tokenizer

    Tokenizer.train(PROSE * 5, vocab_size=300).save(tok)
    out = tmp_path / "build"
    config = BuildConfig(sources=[str(warc), str(jsonl), str(parquet)], out=str(out), tasks=2, kind="text",
                         tokenizer=str(tok), humaneval=False)
    manifest = build(config, workers=1)
    docs = []
    for f in sorted((out / "documents").glob("*.jsonl.gz")):
        docs += [json.loads(line) for line in gzip.open(f, "rt")]
    urls = sorted(d.get("url") for d in docs)
    assert urls == ["https://la.example.edu/m", "https://math.example.org/derivative",
                    "https://math.example.org/integral", "https://notes.example.net/0"]
    assert all(d["language"] == "Text" for d in docs)
    assert manifest["documents_in"] == 7 and manifest["documents_kept"] == 4
    assert manifest["dropped"]["not_html"] == 1
    assert sum(v for k, v in manifest["dropped"].items() if k.startswith("gopher_repetition:")) == 2
    rejected = []
    for f in sorted((out / "rejected").glob("*.jsonl.gz")):
        rejected += [json.loads(line) for line in gzip.open(f, "rt")]
    assert {r["path"] for r in rejected if r["rule"].startswith("gopher")} == {"https://shop.example.com/deal", "j1"}
    # the recall pool reader keeps the inputs' own ids and urls
    recs = list(iter_records(out))
    assert {r["url"] for r in recs} == set(urls)
    assert [r["id"] for r in iter_records(jsonl)] == ["j0", "j1"]
    assert [(r["id"], r["url"]) for r in iter_records(parquet)] == [("p0", "https://la.example.edu/m")]


def test_cli_kind_text_and_bad_filter(web, tmp_path, capsys):
    _, _, jsonl, _ = web
    assert main(["data", "build", str(jsonl), "--out", str(tmp_path / "o"), "--kind", "text",
                 "--text-filters", "nope", "--tasks", "1"]) == 2
    assert "unknown filter 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.warc"
    bad.write_bytes(b"this is not a warc file\n")
    assert main(["data", "build", str(bad), "--out", str(tmp_path / "o2"), "--tasks", "1"]) == 2
    assert "not a readable WARC file" in capsys.readouterr().err


def test_a_web_page_is_text_in_a_code_build(tmp_path):
    from dscoder.data.pipeline import FilterStage
    from dscoder.data.sources import RawDocument

    stage = FilterStage(BuildConfig(sources=[], out=str(tmp_path), humaneval=False))
    rules = stage.config.rule_config
    page_doc = RawDocument(0, "0:0", "https://math.example.org/d", PROSE[0], url="https://math.example.org/d",
                           kind="text")
    assert stage._decide(page_doc, rules, None) == (None, "Text", PROSE[0])
    junk = RawDocument(1, "0:1", "https://shop.example.com/x", JUNK, kind="text")
    assert stage._decide(junk, rules, None)[0].startswith("gopher_repetition:")
    # the same prose as a file of a code build is judged by the code rules
    as_code = RawDocument(2, "0:2", "notes/essay.txt", PROSE[0].encode())
    assert stage._decide(as_code, rules, None)[0] == "text_not_documentation"
