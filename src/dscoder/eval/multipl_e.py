"""MultiPL-E: HumanEval translated into other languages (``humaneval-{lang}.jsonl`` files of nuprl/MultiPL-E),
run with the compilers and interpreters found on this machine.

Each record has ``name``, ``prompt`` (imports, the translated docstring, the signature), ``tests`` (closes the
function, then asserts in a ``main``/test function) and ``stop_tokens``. The program is, as in MultiPL-E,
``prompt + completion + "\\n" + tests`` with the completion cut at the first stop token; it passes when its build
and run command exits 0. A language whose toolchain is missing is skipped with one line saying what to install.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError
from dscoder.eval.base import LoadContext, Option, Problem, Task, cut_at_stops, read_records, scores

# JVM options that let java start under the sandbox's 1 GiB address-space limit
_JAVA = "-Xmx256m -Xss8m -XX:ReservedCodeCacheSize=64m -XX:CompressedClassSpaceSize=64m -XX:+UseSerialGC " \
        "-XX:TieredStopAtLevel=1"


@dataclass(frozen=True)
class Language:
    name: str  # the file suffix in humaneval-{name}.jsonl
    title: str
    file: str  # the program's file name in the sandbox
    command: str  # sh command line; {tool} is replaced by the tool's path inside the sandbox
    tools: tuple[str, ...]  # executables needed (found on PATH)
    install: str  # what to install when missing


LANGUAGES = {lang.name: lang for lang in (
    Language("cpp", "C++", "main.cpp", "{g++} -std=c++17 -o main main.cpp && ./main", ("g++",), "g++"),
    Language("java", "Java", "Problem.java", f"{{java}} {_JAVA} -ea {{classpath}} Problem.java", ("java",),
             "a JDK ≥ 11 (java), and the javatuples jar in $CLASSPATH for the problems that use Pair/Triplet"),
    Language("js", "JavaScript", "main.js", "{node} main.js", ("node",), "Node.js (node)"),
    Language("ts", "TypeScript", "main.ts",
             "{tsc} --target es2020 --lib es2020 --types node main.ts && {node} main.js", ("tsc", "node"),
             "TypeScript (tsc, with @types/node) and Node.js"),
    Language("go", "Go", "main_test.go", "{go} test main_test.go", ("go",), "Go (go)"),
    Language("rs", "Rust", "main.rs", "{rustc} -o main main.rs && ./main", ("rustc",), "Rust (rustc)"),
    Language("sh", "Bash", "main.sh", "{bash} main.sh", ("bash",), "bash"),
    Language("php", "PHP", "main.php", "{php} main.php", ("php",), "PHP (php-cli)"),
    Language("cs", "C#", "main.cs",
             "{mcs} -d:DEBUG -r:System.Numerics.dll -out:main.exe main.cs && {mono} main.exe", ("mcs", "mono"),
             "Mono (mcs, mono)"),
)}
_TUPLES = ("Pair<", "Triplet<", "Unit<", "Quartet<", "Quintet<", "Sextet<", "Septet<", "Octet<", "Ennead<",
           "Decade<")


def find_tools(lang: Language) -> dict[str, str] | str:
    """Tool name → the real executable's path, or the reason the language cannot run here."""
    found: dict[str, str] = {}
    for tool in lang.tools:
        path = shutil.which(tool)
        if path is None:
            return f"{lang.title} skipped: '{tool}' not found (install {lang.install})"
        if tool == "rustc":  # a rustup proxy needs its home directory; run the toolchain's own rustc
            try:
                sysroot = subprocess.run([path, "--print", "sysroot"], capture_output=True, text=True,
                                         timeout=30).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                sysroot = ""
            if sysroot and (Path(sysroot) / "bin" / "rustc").is_file():
                path = str(Path(sysroot) / "bin" / "rustc")
        found[tool] = str(Path(path).resolve())
    return found


def _javatuples() -> str | None:
    import os

    for entry in os.environ.get("CLASSPATH", "").split(os.pathsep):
        if "javatuples" in Path(entry).name and Path(entry).is_file():
            return entry
    return None


@dataclass
class MultiPLEProblem(Problem):
    def program(self, completion: str) -> tuple[str, dict]:
        code = cut_at_stops(completion, self.stop)
        lang: Language = self.data["language"]
        call = {"file": lang.file, "command": lang.command, "tools": self.data["tools"]}
        if lang.name == "java":
            jar = self.data.get("javatuples")
            call["command"] = call["command"].replace("{classpath}", f"-cp {jar}" if jar else "")
            if jar:
                call["tools"] = {**call["tools"], "javatuples": jar}
                call["command"] = call["command"].replace(f"-cp {jar}", "-cp {javatuples}")
        return self.prompt + code + "\n" + self.data["tests"], call


def multipl_e(directory: str | Path | None, languages: list[str] | None = None,
              skipped: dict[str, str] | None = None) -> list[Problem]:
    """Problems of every requested language whose data file exists and whose toolchain is here; the others go
    into ``skipped`` (language → one line) and are printed."""
    if directory is None:
        raise DscoderError("task multipl-e needs --humaneval-x DIR (a folder of MultiPL-E humaneval-LANG.jsonl files)")
    directory = Path(directory)
    if not directory.is_dir():
        raise DscoderError(f"{directory}: not a directory (expected humaneval-{{cpp,java,js,...}}.jsonl in it)")
    wanted = languages or list(LANGUAGES)
    for name in wanted:
        if name not in LANGUAGES:
            raise DscoderError(f"--languages: unknown language '{name}' (known: {', '.join(LANGUAGES)})")
    skipped = {} if skipped is None else skipped
    out: list[Problem] = []
    for name in wanted:
        lang = LANGUAGES[name]
        path = directory / f"humaneval-{name}.jsonl"
        if not path.is_file():
            skipped[name] = f"{lang.title} skipped: {path} not found"
            continue
        tools = find_tools(lang)
        if isinstance(tools, str):
            skipped[name] = tools
            continue
        jar = _javatuples() if name == "java" else None
        for i, row in read_records(path, "MultiPL-E"):
            try:
                prompt, tests, stops, task = row["prompt"], row["tests"], row["stop_tokens"], row["name"]
                if not (isinstance(stops, list) and all(isinstance(x, str) for x in (prompt, tests, task, *stops))):
                    raise TypeError
            except (KeyError, TypeError):
                raise DscoderError(f"{path}:{i}: expected a MultiPL-E record (name, prompt, tests, stop_tokens)") \
                    from None
            if name == "java" and jar is None:
                if any(t in prompt + tests for t in _TUPLES):
                    skipped.setdefault("java/javatuples", "Java: problems using org.javatuples skipped (put the "
                                                          "javatuples jar in $CLASSPATH)")
                    continue
                prompt = prompt.replace("import org.javatuples.*;\n", "")
            out.append(MultiPLEProblem(f"{name}/{task}", prompt, stop=stops,
                                       data={"language": lang, "tests": tests, "tools": tools, "javatuples": jar}))
    for line in skipped.values():
        print(line, file=sys.stderr)
    return out


def _languages(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise DscoderError(f"--languages {text!r}: expected comma-separated names, e.g. cpp,java,js")
    return names


class MultiPLETask(Task):
    name = "multipl-e"
    help = "MultiPL-E: HumanEval in C++, Java, JS, TS, Go, Rust, Bash, PHP, C# with the toolchains found here"
    options = (Option("humaneval_x", "--humaneval-x", "folder of MultiPL-E humaneval-{lang}.jsonl files "
                      "(nuprl/MultiPL-E's HumanEval translations)", metavar="DIR", required=True),
               Option("languages", "--languages", f"languages to run (default: all of {','.join(LANGUAGES)})",
                      parse=_languages, metavar="LANGS"))

    def load(self, options: dict[str, Any], ctx: LoadContext) -> list[Problem]:
        languages = options["languages"]
        if isinstance(languages, str):
            languages = _languages(languages)
        return multipl_e(options["humaneval_x"], languages, ctx.skipped)

    def is_skipped(self, task_id: str, skipped: dict[str, str]) -> bool:
        return task_id.split("/", 1)[0] in skipped

    def summarize(self, summary: dict[str, Any], rows: dict, options: dict[str, Any], out: Path,
                  ks: tuple[int, ...]) -> None:
        summary["languages"] = {}
        for lang in sorted({t.split("/", 1)[0] for t, _ in rows}):
            part = scores({k: v for k, v in rows.items() if k[0].startswith(lang + "/")}, ks)
            summary["languages"][lang] = {k: v for k, v in part.items() if k == "problems" or k.startswith("pass@")}
