"""Language identification with go-enry (GitHub Linguist's strategies: filename, extension, shebang, modeline,
heuristics, a Bayesian classifier), vendored/generated detection, and coverage of the paper's 338 languages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import enry

# Names in the DeepSeek-Coder-V2 list that Linguist spells differently, has renamed, or merged into another
# language (e.g. Arduino and JSX were folded into C++ and JavaScript).
ALIASES = {
    "Perl 6": "Raku", "Bro": "Zeek", "VimL": "Vim Script", "Nimrod": "Nim", "Jade": "Pug",
    "Graphviz DOT": "Graphviz (DOT)", "Fortran Fixed Form": "Fortran", "Apache Configuration": "ApacheConf",
    "Transact-SQL": "TSQL", "AWK": "Awk", "CUDA": "Cuda", "Docker": "Dockerfile", "JSX": "JavaScript",
    "Visual Basic": "Visual Basic .NET", "Web IDL": "WebIDL", "Nginx Configuration File": "Nginx",
    "POV-Ray": "POV-Ray SDL", "Robot Framework": "RobotFramework", "NASM": "Assembly", "GAS": "Unix Assembly",
    "ReasonML": "Reason", "Groff": "Roff", "Arduino": "C++", "Octave": "MATLAB", "HTML Django": "Jinja",
    "HTML ERB": "HTML+ERB", "HTML PHP": "HTML+PHP", "RHTML": "HTML+ERB", "Fish": "fish",
    "Debian Control File": "Debian Package Control File", "COBOLFree": "COBOL", "BrightScript": "Brightscript",
    "XBase": "xBase", "FoxPro": "xBase", "Objdump": "ObjDump", "Velocity": "Velocity Template Language",
    "Q": "q", "Flux": "FLUX", "G-Code": "G-code", "PAWN": "Pawn", "PEG": "PEG.js", "POD": "Pod",
    "Ragel in Ruby Host": "Ragel", "XML Lasso": "Lasso", "MQL": "MQL5",
}


def detect(path: str, content: bytes) -> str:
    """The Linguist language of a file ('' when none), from its name and content."""
    return enry.get_language(Path(path).name, content) or ""


def is_vendor(path: str) -> bool:
    return bool(enry.is_vendor(path))


def is_generated(path: str, content: bytes) -> bool:
    return bool(enry.is_generated(path, content))


def is_binary(content: bytes) -> bool:
    return b"\0" in content[:8000] or bool(enry.is_binary(content[:8000]))


def known(name: str) -> bool:
    return enry.get_language_type(name) != "unknown"


@dataclass
class Coverage:
    exact: list[str]
    renamed: dict[str, str]
    missing: list[str]

    @property
    def total(self) -> int:
        return len(self.exact) + len(self.renamed) + len(self.missing)


def coverage(names: list[str]) -> Coverage:
    """How the detector's language set covers ``names`` (e.g. the paper's 338): exact Linguist names, names
    Linguist spells differently or has merged (``ALIASES``), and names it lacks (the paper's list also holds
    Pygments-only lexer names)."""
    exact, renamed, missing = [], {}, []
    for name in names:
        if known(name):
            exact.append(name)
        elif name in ALIASES and known(ALIASES[name]):
            renamed[name] = ALIASES[name]
        else:
            missing.append(name)
    return Coverage(exact, renamed, missing)
