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

from dscoder.errors import DscoderError
from dscoder.eval.tasks import Problem, _read_jsonl, cut_at_stops

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
    def program(self, completion: str) -> tuple[str, dict | None]:
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
        raise DscoderError("task multipl-e needs --humaneval-x DIR (e.g. ../shared/data/humaneval-x/)")
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
        for i, row in enumerate(_read_jsonl(path, "MultiPL-E"), 1):
            try:
                prompt, tests, stops, task = row["prompt"], row["tests"], list(row["stop_tokens"]), row["name"]
                if not all(isinstance(x, str) for x in (prompt, tests, task, *stops)):
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
