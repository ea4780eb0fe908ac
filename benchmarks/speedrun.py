"""The speedrun ablation: how many steps does each idea of the recipe save to reach the model of the old defaults?

    python benchmarks/speedrun.py --out speedrun                    # every row, 2 seeds, 600 steps
    python benchmarks/speedrun.py --out speedrun --rows baseline,+muon --seeds 1
    python benchmarks/speedrun.py --out speedrun-mlm --objective mlm
    python benchmarks/speedrun.py --out speedrun --row "+muon=--optimizer muon --muon_lr 0.02"   # try a value

The experiment, all through train.py (one subprocess per run, this same python, --threads 1 each
so that --parallel runs side by side without fighting over cores):

1. A corpus larger than the built-in one: the English manual pages that this machine's Debian
   packages installed (/usr/share/man/man1 .. man8, *.gz regular files; not the translations in
   /usr/share/man/<lang>/, not symlinks, not `.so` redirects), turned into plain text by the small
   roff stripper below (roff_to_text). Why not `man`/`groff`: one groff process per page costs
   tens of milliseconds (minutes for thousands of pages), groff's output depends on its version and
   the terminal width, and a minimal container often has neither; the stripper is pure Python,
   the same on every machine, and keeps what a language model should read (the words, one
   paragraph per line) and drops the typesetting. Pages are taken in a fixed order (section, then
   file name), at most --max_pages_per_package from one package (a package that generates
   thousands of near-identical pages, such as google-cloud-cli's gcloud reference, would otherwise
   be most of the corpus), written once to CACHE/manpages.txt with `<|endoftext|>` between pages,
   with CACHE/packages.tsv (pages and characters per package) and CACHE/corpus.json (its size).
   train.py holds out --val_fraction of the pages (whole pages, evenly spaced: the split is by
   document, minilm/data/preparation.py).
2. One tokenizer and one set of token files (OUT/prepared, made by `train.py --max_steps 0`), put
   into every run's out_dir before it starts (hard links, or copies), so every row reads the same
   ids and no run pays for a tokenizer: train.py reuses prepared data made from the same files,
   vocab size and preparation flags (minilm/provenance.py, tokenizer_and_data).
3. The rows (ROWS), each adding one idea to the row before it, --seeds seeds each, --steps steps
   of the default CLM shape (4 layers x 256, seq 128, batch 16), evaluated every --eval_every
   steps. For each run: its validation curve (metrics.jsonl), final val loss and bits per byte,
   and its steps to target.
4. Steps to target: the target is the baseline's final validation loss (the mean over its seeds).
   A row's steps to target is the first step at which its validation loss, averaged over its
   seeds at each evaluation, is at or below the target, interpolated linearly between that
   evaluation and the one before (so --eval_every sets the resolution); the ratio is that over
   the baseline's own steps to target (about --steps). Each seed's own crossing is in
   OUT/results.json (a seed that never reaches the target has none). The markdown table is
   printed and written to OUT/table.md; the curves go to OUT/curves.png through minilm.plot when
   matplotlib is installed.

--objective mlm: the masked LM at equal tokens, baseline vs +muon vs +muon+wsd (MLM_ROWS); the
same table (the target then is the masked LM baseline's final loss).

Every run has its own out_dir under OUT/runs and a speedrun.json beside its metrics; a run that
finished with the same command and the same prepared data is not run again, so an interrupted
ablation picks up where it stopped and a new row runs alone.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from minilm.errors import UserError  # noqa: E402
from minilm.plot import read_metrics  # noqa: E402

MAN_ROOT = "/usr/share/man"
SECTIONS = [f"man{i}" for i in range(1, 9)]
DOC_SEPARATOR = "<|endoftext|>"          # minilm/data/reading.py's separator of documents in a text file
CORPUS_NAME = "manpages.txt"
RECORD = "speedrun.json"
CORPUS_VERSION = 1                       # raise it when roff_to_text changes: the cached corpus is made again

# Each row adds one idea to the row before it: (name, train.py flags). The flags are those of the
# issue 21 contract; the numbers are the sources' (see each flag's docstring in minilm/).
OLD_DEFAULTS = ["--optimizer", "adamw", "--schedule", "cosine", "--qk_norm", "false"]   # before issue 21
ROWS = [
    ("baseline", OLD_DEFAULTS),                                # the defaults the recipe was measured against
    ("+muon", ["--optimizer", "muon"]),                        # Muon on the blocks' 2-D matrices
    ("+wsd", ["--schedule", "wsd"]),                           # warmup, stable, linear decay (last 20%)
    ("+qk_norm", ["--qk_norm", "true"]),                       # RMSNorm on each head's q and k: clm's defaults now
    ("+relu2", ["--mlp", "relu2"]),                            # relu(x)^2 MLP (Primer)
    ("+softcap", ["--logit_softcap", "30"]),                   # 30 tanh(logits / 30) (Gemma 2)
    ("+untied", ["--tie_embeddings", "false", "--embedding_lr", "0.01", "--lm_head_lr", "0.002"]),
]
# the masked LM: does the optimizer and schedule part of the recipe help it at equal tokens?
MLM_ROWS = [
    ("baseline", OLD_DEFAULTS),                                # the masked LM's own defaults, stated
    ("+muon", ["--optimizer", "muon"]),
    ("+muon+wsd", ["--schedule", "wsd"]),
]


# ----------------------------------------------------------------------------- the corpus: roff to text
# \(xx and \[name] special characters: the ones man pages use, as plain ASCII
SPECIAL = {"em": "--", "en": "-", "hy": "-", "mi": "-", "bu": "*", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
           "oq": "'", "cq": "'", "ga": "`", "ha": "^", "ti": "~", "at": "@", "sl": "/", "rs": "\\", "bv": "|",
           "ba": "|", "co": "(c)", "rg": "(R)", "tm": "(TM)", "mu": "x", "di": "/", "pl": "+", "eq": "=",
           "<=": "<=", ">=": ">=", "!=": "!=", "->": "->", "<-": "<-", "rA": "=>", "lA": "<=", "de": " degrees",
           "Fo": "<<", "Fc": ">>", "fo": "<", "fc": ">", "ss": "ss", "aa": "'", "sq": "*", "sh": "#", "Do": "$",
           "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "<", "ra": ">", "pc": ".", "ct": "c", "ps": "P",
           "sc": "S", "Eu": "EUR", "eu": "EUR", "Po": "GBP", "Ye": "JPY", "12": "1/2", "14": "1/4", "34": "3/4",
           "+-": "+-", "no": "~", "or": "|", "ul": "_", "ru": "_", "'e": "e", "'a": "a", ":u": "u",
           ":o": "o", ":a": "a", ",c": "c", "`e": "e", "`a": "a", "^e": "e"}
# \*x, \*(xx, \*[name] predefined strings man pages use (man's and pod2man's)
STRINGS = {"R": "(R)", "lq": '"', "rq": '"', "Tm": "(TM)", "S": "", "--": "--", "PI": "pi", "L\"": '"',
           "R\"": '"', "C`": '"', "C'": '"', "`": "", "'": "", "^": "", ",": "", "~": "", "/": "", ":": "",
           "8": "ss", "o": "", "d-": "d", "D-": "D", "th": "th", "Th": "Th", "ae": "ae", "Ae": "AE"}
# requests and macros whose arguments are text to keep (as one line or words of the paragraph)
HEADINGS = {"SH", "SS", "Sh", "Ss"}
TEXT_MACROS = {"B", "I", "SM", "SB", "BI", "BR", "IB", "IR", "RB", "RI", "UR", "MT", "OP", "SY", "TQ", "IP", "TP",
               "HP", "LP", "PP", "P", "Nm", "Nd", "Ar", "Fl", "Op", "Cm", "Pa", "Ev", "Va", "Dv", "Er", "Fn", "Fa",
               "Ft", "Fd", "Ic", "Li", "Ql", "Sy", "Em", "Xr", "Dq", "Sq", "Pq", "Aq", "Bq", "Brq", "Qq",
               "It", "Tn", "Ux", "Bx", "Ox", "Nx", "Fx", "Lk", "Mt", "An", "St", "Ad", "Cd", "Ms", "No", "Ns",
               "Pf", "Dl", "Vt", "Lb", "In"}
ALTERNATING = {"BI", "BR", "IB", "IR", "RB", "RI"}      # font-alternating: their words join without spaces
BREAKS = {"br", "sp", "PP", "LP", "P", "TP", "TQ", "IP", "HP", "RS", "RE", "SH", "SS", "Sh", "Ss", "Pp", "Bl",
          "El", "It", "Bd", "Ed", "Dl", "nf", "fi", "EX", "EE", "ne", "bp", "in", "ti", "Nd", "Sy", "SY", "YS",
          "UE", "ME", "TS", "TE", "D1"}
SKIP_BLOCKS = {"de": "..", "de1": "..", "am": "..", "ig": "..", "TS": ".TE", "EQ": ".EN", "PS": ".PE"}
MDOC_WORDS = re.compile(r"^(?:[A-Z][a-z]{1,2}|Ns|No|Pf)$")   # an mdoc macro name inside a macro line's words
ESCAPE = re.compile(r"""\\(?:
      f(?:\[[^\]]*\]|\(..|.)              # font change
    | s(?:[-+]?\d|\([-+]?\d\d|\[[^\]]*\]|'[^']*')  # size change
    | [nmgF*](?:\[[^\]]*\]|\(..|.)        # registers, colours, strings (strings are looked up first)
    | [hvwlLDoZXbBNSRx](?:'[^']*'|\[[^\]]*\])  # motions, widths, drawing, device controls
    | \((..)                              # \(xx special character
    | \[([^\]]*)\]                        # \[name] special character
    | [kz$](?:\[[^\]]*\]|\(..|.)
    | (.)                                 # everything else: one character
    )""", re.VERBOSE)
STRING_ESCAPE = re.compile(r"\\\*(?:\[([^\]]*)\]|\((..)|(.))")
ONE_CHARACTER = {"e": "\\", "\\": "\\", "-": "-", "&": "", ")": "", "c": "", " ": " ", "~": " ", "0": " ",
                 "|": "", "^": "", "%": "", ":": "", "/": "", ",": "", "t": " ", "a": "", "'": "'", "`": "`",
                 ".": ".", "d": "", "u": "", "p": "", "r": "", "{": "", "}": "", "!": "", "?": "", "E": "\\"}


def unescape(text: str) -> str:
    """A roff text line's escapes resolved: fonts and sizes dropped, special characters as ASCII."""
    text = STRING_ESCAPE.sub(lambda m: STRINGS.get(m.group(1) or m.group(2) or m.group(3), ""), text)

    def one(m):
        special = m.group(1) or m.group(2)
        if special is not None:
            name = special[2:] if special.startswith("u00") and len(special) == 6 else None
            if name is not None:   # \[u00e9]: a Unicode code point
                try:
                    return chr(int(special[1:], 16))
                except ValueError:
                    return ""
            return SPECIAL.get(special, "")
        if m.group(3) is not None:
            return ONE_CHARACTER.get(m.group(3), m.group(3))
        return ""
    return ESCAPE.sub(one, text)


def macro_words(args: str) -> list[str]:
    """A macro line's arguments: words, or "quoted phrases" as one word."""
    words = re.findall(r'"((?:[^"]|"")*)"?|(\S+)', args)
    return [(quoted if quoted else plain).replace('""', '"') for quoted, plain in words if quoted or plain]


def roff_to_text(source: str) -> str:
    """A man page's roff source as plain text: headings on a line of their own, each filled
    paragraph joined into one line, no-fill blocks (.nf, .EX) kept line by line, comments,
    macro definitions, conditionals, tables and equations dropped. Good enough to read, not a
    typesetter: man(7) and the common mdoc(7) macros."""
    out: list[str] = []
    paragraph: list[str] = []
    fill, skip_until, depth, tag_next = True, None, 0, False   # tag_next: .TP's next line is its tag

    def flush():
        if paragraph:
            line = " ".join(paragraph)
            line = line.replace("\x00 ", "").replace("\x00", "")   # \c joins
            line = re.sub(r"\s+", " ", line).strip() if fill else line.rstrip()   # no-fill keeps its indent
            if line:
                out.append(line)
            paragraph.clear()

    lines: list[str] = []
    for raw in source.splitlines():   # a line ending in an escaped newline continues on the next one
        if lines and lines[-1].endswith("\\") and (len(lines[-1]) - len(lines[-1].rstrip("\\"))) % 2:
            lines[-1] = lines[-1][:-1] + raw
        else:
            lines.append(raw)
    for raw in lines:
        if skip_until is not None:
            if raw.strip().startswith(skip_until):
                skip_until = None
            continue
        if depth:   # inside a conditional's \{ ... \} block
            depth += raw.count("\\{") - raw.count("\\}")
            depth = max(depth, 0)
            continue
        line = re.sub(r'\\".*', "", raw)         # comments: \" to the end of the line
        if raw.startswith((".\\\"", "'\\\"", '.\\#')):
            continue
        if line[:1] in (".", "'"):
            request = line[1:].strip()
            if not request:
                continue
            name = re.match(r"[^\s\\]*", request).group(0)   # `.el\{\` is the request el
            args = request[len(name):].strip()
            if name in SKIP_BLOCKS:
                skip_until = SKIP_BLOCKS[name]
                continue
            if name in ("if", "ie", "el", "while"):
                depth = max(line.count("\\{") - line.count("\\}"), 0)
                continue
            if name in BREAKS:
                flush()
            if name in ("TP", "TQ"):
                tag_next = True
            if name in ("nf", "EX", "Bd"):
                fill = False
            elif name in ("fi", "EE", "Ed"):
                fill = True
            if name in HEADINGS:
                flush()
                heading = unescape(" ".join(macro_words(args))).strip()
                if heading:
                    out.append("")
                    out.append(heading)
                continue
            if name in TEXT_MACROS:
                words = macro_words(args)
                if name in ("IP", "TP", "HP"):
                    words = words[:1]      # the tag; the rest are indents
                if name in ("Nm", "Nd", "Ar", "Fl", "Op", "Cm", "It", "Xr", "Dq", "Sq", "Pq", "Aq", "Qq", "Sy",
                            "Em", "Pa", "Ev", "Va", "Dv", "Er", "Fn", "Fa", "Ft", "Ic", "Li", "Ql", "Tn", "Pf",
                            "Dl", "Vt", "Cd", "Ad", "Ms", "No", "Ns", "Lk", "Mt", "An", "Brq", "Bq", "Fd"):
                    words = [w for w in words if not MDOC_WORDS.match(w)]
                    if name == "Fl":
                        words = ["-" + w for w in words] or ["-"]
                    if name == "Nd":
                        words = ["-", *words]
                joined = ("" if name in ALTERNATING else " ").join(words)
                text = unescape(joined)
                if text.strip():
                    paragraph.append(text.strip())
                    if not fill or tag_next or name in ("IP", "Nd", "It"):
                        flush()
                        tag_next = False
            continue        # every other request: typesetting only
        text = unescape(line)
        if not text.strip():
            flush()
            continue
        if line.rstrip().endswith("\\c"):
            text = text.rstrip() + "\x00"
        paragraph.append(text.strip() if fill else text.rstrip())
        if not fill or (tag_next and not text.endswith("\x00")):
            flush()
            tag_next = False
    flush()
    text = "\n".join(out).strip()
    text = re.sub(r"\n{3,}", "\n\n", text)
    return "\n".join(line for line in text.split("\n") if line.strip() != DOC_SEPARATOR)


def owners(root: str = "/var/lib/dpkg/info", prefix: str = MAN_ROOT) -> dict[str, str]:
    """path -> the Debian package that installed it, for the paths under `prefix`, from dpkg's
    file lists (no dpkg process)."""
    owner: dict[str, str] = {}
    if not os.path.isdir(root):
        return owner
    for name in sorted(os.listdir(root)):
        if not name.endswith(".list"):
            continue
        package = name[:-len(".list")].split(":")[0]
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(prefix):
                    owner[line.rstrip("\n")] = package
    return owner


def man_pages(root: str = MAN_ROOT) -> list[str]:
    """The English top-level pages: root/man1 .. man8, regular *.gz files (no symlinks), sorted by
    section then file name."""
    pages = []
    for section in SECTIONS:
        folder = os.path.join(root, section)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".gz") and os.path.isfile(path) and not os.path.islink(path):
                pages.append(path)
    return pages


def read_page(path: str) -> str | None:
    """A page's roff source, or None for a `.so` redirect (the page it names is in the corpus)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", errors="replace")
    if text.lstrip().startswith(".so ") and len(text.strip().splitlines()) <= 2:
        return None
    return text


@dataclass
class Page:
    path: str          # /usr/share/man/manN/name.N.gz
    section: str       # "man1" .. "man8"
    package: str       # the Debian package that installed it ("(no package)" when dpkg does not say)
    text: str          # roff_to_text of its source


def corpus_pages(root: str = MAN_ROOT, max_pages_per_package: int = 300, dpkg_info: str = "/var/lib/dpkg/info",
                 pages: list[str] | None = None, skipped: list[str] | None = None):
    """The pages of the corpus, in its order: man_pages(root), at most max_pages_per_package of one
    package (0: no cap), readable, and at least 200 characters of text (shorter: a redirect, or a
    stub with no prose). `skipped` (a list, when given) gets the paths over the cap or unreadable. The
    corpus file and compare_objectives.py's man-page task both read the pages through this."""
    owner = owners(dpkg_info, root)
    taken: dict[str, int] = {}
    for path in (man_pages(root) if pages is None else pages):
        package = owner.get(path, "(no package)")
        if max_pages_per_package and taken.get(package, 0) >= max_pages_per_package:
            if skipped is not None:
                skipped.append(path)
            continue
        try:
            source = read_page(path)
        except (OSError, EOFError, gzip.BadGzipFile):
            if skipped is not None:
                skipped.append(path)
            continue
        text = roff_to_text(source) if source is not None else ""
        if len(text) < 200:
            continue
        taken[package] = taken.get(package, 0) + 1
        yield Page(path, os.path.basename(os.path.dirname(path)), package, text)


def build_corpus(cache: str, root: str = MAN_ROOT, max_pages_per_package: int = 300, log=print,
                 dpkg_info: str = "/var/lib/dpkg/info") -> str:
    """Write cache/manpages.txt (unless it is there, made with the same settings from the same
    pages) and return its path. Also cache/packages.tsv and cache/corpus.json."""
    corpus = os.path.join(cache, CORPUS_NAME)
    info_path = os.path.join(cache, "corpus.json")
    pages = man_pages(root)
    if not pages:
        raise UserError(f"no manual pages under {root}/man1..man8; install some (apt-get install manpages "
                        "manpages-dev) or give --corpus a text file")
    settings = {"version": CORPUS_VERSION, "root": os.path.abspath(root), "max_pages_per_package": max_pages_per_package,
                "pages": len(pages), "newest": max(os.stat(p).st_mtime_ns for p in pages)}
    if os.path.exists(corpus) and os.path.exists(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("settings") == settings:
            log(f"corpus: reusing {corpus} ({info['mb']:.1f} MB, {info['documents']:,} pages)")
            return corpus
    taken: dict[str, list[int]] = {}    # package -> [pages, characters]
    start = time.perf_counter()
    os.makedirs(cache, exist_ok=True)
    documents = 0
    skipped: list[str] = []
    with open(corpus + ".tmp", "w", encoding="utf-8") as out:
        for page in corpus_pages(root, max_pages_per_package, dpkg_info, pages=pages, skipped=skipped):
            if documents:
                out.write(f"\n{DOC_SEPARATOR}\n")
            out.write(page.text)
            documents += 1
            counts = taken.setdefault(page.package, [0, 0])
            counts[0] += 1
            counts[1] += len(page.text)
    os.replace(corpus + ".tmp", corpus)
    size = os.path.getsize(corpus)
    with open(os.path.join(cache, "packages.tsv"), "w", encoding="utf-8") as f:
        f.write("package\tpages\tcharacters\n")
        for package, (n, chars) in sorted(taken.items(), key=lambda kv: (-kv[1][1], kv[0])):
            if n:
                f.write(f"{package}\t{n}\t{chars}\n")
    info = {"settings": settings, "documents": documents, "bytes": size, "mb": size / 1e6,
            "packages": sum(1 for n, _ in taken.values() if n), "pages_over_cap_or_unreadable": len(skipped)}
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    log(f"corpus: wrote {corpus}: {size / 1e6:.1f} MB, {documents:,} pages from {info['packages']} packages "
        f"({len(skipped)} over the per-package cap or unreadable) in {time.perf_counter() - start:.0f} s; "
        f"per package: {os.path.join(cache, 'packages.tsv')}")
    return corpus


# ----------------------------------------------------------------------------- tokens to target
def steps_to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first step at which a validation curve [(step, loss), ...] is at or below `target`,
    interpolated linearly between that evaluation and the one before it; None if it never is.
    A curve already at the target at its first evaluation gives that evaluation's step."""
    previous = None
    for step, loss in sorted(curve):
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (s0, l0) = previous
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        previous = (step, loss)
    return None


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The seeds' validation curves averaged at the steps every seed evaluated."""
    steps = set.intersection(*(set(s for s, _ in c) for c in curves)) if curves else set()
    by_step = [dict(c) for c in curves]
    return [(s, sum(d[s] for d in by_step) / len(by_step)) for s in sorted(steps)]


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with two seeds each seed sits at one end of mean +- that."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def cell(values: list[float], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, half = spread(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def summarize(curves: dict[str, list[list[tuple[float, float]]]], bpbs: dict[str, list[float | None]],
              baseline: str = "baseline") -> dict[str, dict]:
    """Per row: final losses, bpb, steps to the target (the baseline's mean final loss) of the
    seed-mean curve and of each seed, and the ratio to the baseline's steps."""
    finals = {row: [c[-1][1] for c in cs] for row, cs in curves.items()}
    target = sum(finals[baseline]) / len(finals[baseline])
    result = {}
    for row, cs in curves.items():
        result[row] = {"final_loss": finals[row], "bpb": bpbs.get(row, []),
                       "steps_to_target": steps_to_target(mean_curve(cs), target),
                       "seed_steps_to_target": [steps_to_target(c, target) for c in cs]}
    base = result[baseline]["steps_to_target"]
    for row in result.values():
        mine = row["steps_to_target"]
        row["ratio"] = mine / base if mine is not None and base else None
    return {"target": target, "rows": result}


def table(summary: dict, seeds: int) -> list[str]:
    header = ["row", "seeds", "final val loss", "val bpb", "steps to target", "ratio"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in summary["rows"].items():
        steps, ratio = row["steps_to_target"], row["ratio"]
        lines.append("| " + " | ".join([
            name, str(len(row["final_loss"])), cell(row["final_loss"], 4), cell(row["bpb"], 4),
            "not reached" if steps is None else f"{steps:.0f}", "-" if ratio is None else f"{ratio:.2f}x"]) + " |")
    lines.append("")
    lines.append(f"target: the baseline's final val loss, {summary['target']:.4f} (mean of {seeds} seed(s)); "
                 "steps to target from the seed-mean curve, interpolated between evaluations; ± is half the "
                 "range over the seeds")
    return lines


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    row: str
    seed: int
    flags: list[str]               # train.py's command line (without --out_dir)
    out_dir: str

    @property
    def name(self) -> str:
        return f"{self.row}-s{self.seed}"


def folder_name(row: str) -> str:
    """A row's folder (and legend) name: +muon+wsd -> muon_wsd."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", row.lstrip("+").replace("+", "_")).strip("_") or "row"


def prepared_signature(prepared: str) -> dict:
    with open(os.path.join(prepared, "data", "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return {"tokenizer": meta.get("tokenizer"), "signature": meta.get("signature"),
            "train_tokens": meta.get("train_tokens")}


def finished(run: Run, prepared: str) -> bool:
    path = os.path.join(run.out_dir, RECORD)
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    return record.get("flags") == run.flags and record.get("prepared") == prepared_signature(prepared)


def link_prepared(prepared: str, out_dir: str) -> None:
    """The shared tokenizer and token files into a run's out_dir (hard links where the filesystem
    allows, else copies): train.py reuses them, reading them only (np.memmap mode "r")."""
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    pairs = [(os.path.join(prepared, "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))]
    pairs += [(os.path.join(prepared, "data", n), os.path.join(out_dir, "data", n))
              for n in sorted(os.listdir(os.path.join(prepared, "data")))]
    for src, dst in pairs:
        if os.path.exists(dst):
            os.unlink(dst)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def thread_env(run: Run) -> dict:
    """The environment of a run: OpenMP's and MKL's pools as small as torch's (--threads), so that
    runs side by side do not oversubscribe the cores."""
    threads = run.flags[run.flags.index("--threads") + 1] if "--threads" in run.flags else ""
    env = dict(os.environ)
    if threads and threads != "0":
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def execute(run: Run, prepared: str, keep_checkpoints: bool, log=print) -> None:
    """train.py for `run`, unless it finished before with the same flags and prepared data."""
    if finished(run, prepared):
        log(f"  {run.name}: done before, skipped")
        return
    if os.path.isdir(run.out_dir):
        shutil.rmtree(run.out_dir)
    link_prepared(prepared, run.out_dir)
    command = [sys.executable, os.path.join(REPO, "train.py"), *run.flags, "--out_dir", run.out_dir]
    log_path = os.path.join(run.out_dir, "train.log")
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=thread_env(run)).returncode
    wall = time.perf_counter() - start
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().strip().splitlines()[-8:]
        raise UserError(f"{run.name} failed (exit code {code}); its output is in {log_path}:\n"
                        + "\n".join("    " + line for line in tail))
    if not keep_checkpoints:   # ~tens of MB each; the table needs only metrics.jsonl
        for name in os.listdir(run.out_dir):
            if name.startswith("ckpt-") and name.endswith(".pt"):
                os.unlink(os.path.join(run.out_dir, name))
    with open(os.path.join(run.out_dir, RECORD), "w", encoding="utf-8") as f:
        json.dump({"flags": run.flags, "prepared": prepared_signature(prepared), "wall_s": wall}, f, indent=1)
    last = evaluations(run.out_dir)[-1]
    log(f"  {run.name}: {wall:.0f} s, val loss {last['val_loss']:.4f}, bpb {last.get('val_bpb', float('nan')):.4f}")


def evaluations(out_dir: str) -> list[dict]:
    return [row for row in read_metrics(out_dir, log=lambda msg: None) if "val_loss" in row]


def prepare(corpus: str, out: str, args, log=print) -> str:
    """OUT/prepared: the tokenizer and token files every run reads (train.py --max_steps 0)."""
    prepared = os.path.join(out, "prepared")
    command = [sys.executable, os.path.join(REPO, "train.py"), "--data", corpus, "--out_dir", prepared,
               "--max_steps", "0", "--objective", args.objective, "--vocab_size", str(args.vocab_size),
               "--seed", "1337", "--val_fraction", str(args.val_fraction)]
    os.makedirs(prepared, exist_ok=True)
    log_path = os.path.join(prepared, "prepare.log")
    with open(log_path, "w", encoding="utf-8") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            last = (f.read().strip().splitlines() or [""])[-1]
        raise UserError(f"preparing the data failed (exit code {code}): {last} (all of it: {log_path})")
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(("prepared ", "reusing ")):
                log("data: " + line.strip())
    return prepared


def plan(rows, seeds: list[int], args, out: str) -> list[Run]:
    runs, flags = [], []
    for name, extra in rows:
        flags = flags + extra          # each row: the previous row's flags and its own
        if args.only and name not in args.only:
            continue
        for seed in seeds:
            common = ["--objective", args.objective, "--max_steps", str(args.steps), "--seed", str(seed),
                      "--eval_every", str(args.eval_every), "--eval_batches", str(args.eval_batches),
                      "--threads", str(args.threads), "--device", args.device, "--vocab_size", str(args.vocab_size),
                      "--data", args.corpus_path, "--val_fraction", str(args.val_fraction),
                      "--ckpt_every", str(args.steps), "--keep_checkpoints", "1"]
            runs.append(Run(name, seed, common + args.extra + flags,
                            os.path.join(out, "runs", f"{folder_name(name)}-s{seed}")))
    return runs


def draw(paths: list[str], out: str, log=print) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log(f"no {os.path.basename(out)}: matplotlib is not installed (pip install matplotlib); then: "
            f"python -m minilm.plot {' '.join(paths)} -o {out}")
        return
    from minilm.plot import plot_runs
    plot_runs(paths, out, log=lambda msg: None)
    log(f"wrote {out}")


# ----------------------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, as every minilm command
        raise UserError(f"{message} (see python benchmarks/speedrun.py --help)")


def parse_args(argv: list[str]):
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="speedrun", help="the folder for prepared data, runs, table.md, curves.png")
    p.add_argument("--objective", default="clm", choices=["clm", "mlm"],
                   help="clm: every row of ROWS; mlm: baseline, +muon, +muon+wsd")
    p.add_argument("--rows", "--only", dest="only", default="",
                   help="comma-separated row names to run (default all; the baseline is needed for the target)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per row (1337, 1338, ...)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (the default CLM shape)")
    p.add_argument("--eval_every", type=int, default=50, help="steps between validations: the target's resolution")
    p.add_argument("--eval_batches", type=int, default=20, help="batches per validation")
    p.add_argument("--parallel", type=int, default=2, help="runs at the same time, --threads threads each")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu", help="train.py's --device for every run")
    p.add_argument("--vocab_size", type=int, default=4096, help="the shared tokenizer's size")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of pages held out for validation")
    p.add_argument("--corpus", default="", help="a text file to use instead of the man pages")
    p.add_argument("--cache", default="", help="where the man-page corpus is written once (default OUT/corpus)")
    p.add_argument("--man_root", default=MAN_ROOT, help="the manual pages' root folder")
    p.add_argument("--max_pages_per_package", type=int, default=300,
                   help="at most this many pages from one Debian package (0 = no cap)")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep each run's final checkpoint")
    p.add_argument("--row", action="append", default=[], metavar="NAME=FLAGS",
                   help="replace a row's own flags (--row '+muon=--optimizer muon --muon_lr 0.02'), or add a row "
                        "after the others, on top of all of them; repeatable")
    p.add_argument("--extra", default="", help="more train.py flags for every run, e.g. '--n_layer 2 --n_embd 64'")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.eval_every < 1 or args.parallel < 1:
        raise UserError("--seeds, --steps, --eval_every and --parallel must be at least 1")
    args.only = [r.strip() for r in args.only.split(",") if r.strip()]
    args.extra = args.extra.split()
    return args


def with_rows(rows: list[tuple[str, list[str]]], specs: list[str]) -> list[tuple[str, list[str]]]:
    """The rows with each --row NAME=FLAGS applied: a known name gets these flags instead of its
    own (the rows after it still build on it), a new name is added at the end."""
    rows = list(rows)
    for spec in specs:
        name, eq, flags = spec.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UserError(f"--row {spec!r}: give NAME=FLAGS, e.g. --row '+muon=--optimizer muon --muon_lr 0.02'")
        names = [n for n, _ in rows]
        if name in names:
            rows[names.index(name)] = (name, flags.split())
        else:
            rows.append((name, flags.split()))
    return rows


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    rows = with_rows(ROWS if args.objective == "clm" else MLM_ROWS, args.row)
    unknown = [r for r in args.only if r not in dict(rows)]
    if unknown:
        raise UserError(f"unknown row(s) {', '.join(unknown)}; the {args.objective} rows are "
                        f"{', '.join(name for name, _ in rows)}")
    if args.only and "baseline" not in args.only:   # its final loss is every row's target
        print("note: the baseline row sets the target: running it too (skipped if done)", flush=True)
        args.only.insert(0, "baseline")
    if args.corpus and not os.path.isfile(args.corpus):
        raise UserError(f"--corpus {args.corpus} is not a file")
    out = args.out
    os.makedirs(out, exist_ok=True)
    args.corpus_path = os.path.abspath(args.corpus or build_corpus(args.cache or os.path.join(out, "corpus"),
                                                                   args.man_root, args.max_pages_per_package))
    print(f"corpus: {args.corpus_path}, {os.path.getsize(args.corpus_path) / 1e6:.1f} MB", flush=True)
    prepared = prepare(args.corpus_path, out, args)
    seeds = [1337 + i for i in range(args.seeds)]
    runs = plan(rows, seeds, args, out)
    print(f"{len(runs)} runs, {args.parallel} at a time, {args.threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        for future in [pool.submit(execute, run, prepared, args.keep_checkpoints) for run in runs]:
            future.result()
    curves: dict[str, list] = {}
    bpbs: dict[str, list] = {}
    for run in runs:
        evals = evaluations(run.out_dir)
        curves.setdefault(run.row, []).append([(r["step"], r["val_loss"]) for r in evals])
        bpbs.setdefault(run.row, []).append(evals[-1].get("val_bpb"))
    summary = summarize(curves, bpbs)
    summary["runs"] = {run.name: {"row": run.row, "seed": run.seed, "flags": run.flags, "out_dir": run.out_dir}
                       for run in runs}
    summary["tokens_per_step"] = per_step = evaluations(runs[0].out_dir)[-1]["tokens"] / args.steps
    for row in summary["rows"].values():
        row["tokens_to_target"] = None if row["steps_to_target"] is None else row["steps_to_target"] * per_step
    lines = [f"speedrun ({args.objective}, {args.steps} steps, {args.seeds} seed(s), corpus "
             f"{os.path.basename(args.corpus_path)} {os.path.getsize(args.corpus_path) / 1e6:.1f} MB, "
             f"{per_step:,.0f} tokens per step)", "", *table(summary, args.seeds)]
    print("\n".join(lines))
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    draw([run.out_dir for run in runs], os.path.join(out, "curves.png"))


if __name__ == "__main__":
    from minilm.cli import run_cli
    run_cli(main)
