"""Real English text with sense labels, from Princeton WordNet 3.0 (Debian's packages).

Each synset has a gloss and often example sentences ("the bank was steep"); an
example that contains one of the synset's lemmas is a usage of that word in a known
sense. That gives the demo and the benchmarks a real corpus (glosses and examples)
and ground truth for word-in-context probes, with no download at run time beyond
Debian's own package archive.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SYSTEM_DIR = Path("/usr/share/wordnet")
PACKAGES = ("wordnet-base",)
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
# WordNet 3.0's lexicographer files, by number (lexnames(5WN)).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()


class WordNetError(RuntimeError):
    """WordNet could not be found or fetched; the message says what to install."""


@dataclass
class Synset:
    offset: str
    pos: str
    lemmas: list[str]
    gloss: str
    examples: list[str]
    lexname: str = ""
    """The lexicographer file (semantic category), e.g. noun.animal."""


def ensure_wordnet(cache_dir: str | Path = ".cache/wordnet") -> Path:
    """The WordNet dict directory: the system's, a cached copy, or fetched with apt-get download."""
    if all((SYSTEM_DIR / f).is_file() for f in DATA_FILES):
        return SYSTEM_DIR
    cache = Path(cache_dir)
    target = cache / "usr" / "share" / "wordnet"
    if all((target / f).is_file() for f in DATA_FILES):
        return target
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise WordNetError("WordNet not found and apt-get/dpkg-deb are missing: install Debian's wordnet-base")
    with tempfile.TemporaryDirectory() as tmp:
        for package in PACKAGES:
            proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise WordNetError(f"apt-get download {package} failed ({proc.stderr.strip()[-300:]}); "
                                   "run 'apt-get update' or install wordnet-base")
        staging = Path(tmp) / "root"
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, cache, dirs_exist_ok=True)
    return target


def read_synsets(wordnet_dir: str | Path) -> list[Synset]:
    """Every synset of the four data files, with lemmas, gloss and example sentences."""
    synsets = []
    for name in DATA_FILES:
        with open(Path(wordnet_dir) / name, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):
                    continue  # licence header
                synsets.append(_parse_line(line))
    return synsets


def _parse_line(line: str) -> Synset:
    head, _, gloss_part = line.partition(" | ")
    fields = head.split()
    offset, lexfile, pos, n_words = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
    lemmas = [fields[4 + 2 * i].lower() for i in range(n_words)]
    lemmas = [re.sub(r"\(.*\)$", "", lemma).replace("_", " ") for lemma in lemmas]
    examples = re.findall(r'"([^"]+)"', gloss_part)
    gloss = gloss_part.split(";")[0].strip().strip('"')
    lexname = LEXNAMES[lexfile] if lexfile < len(LEXNAMES) else f"lex{lexfile:02d}"
    return Synset(offset, pos, lemmas, gloss, [e.strip() for e in examples if e.strip()], lexname)


def labelled_usages(synsets: list[Synset]) -> list[dict]:
    """Examples containing one of their synset's single-word lemmas: {word, sense, text, char span}."""
    usages = []
    for synset in synsets:
        for example in synset.examples:
            for lemma in synset.lemmas:
                if " " in lemma:
                    continue
                found = re.search(rf"\b{re.escape(lemma)}\b", example, flags=re.IGNORECASE)
                if found:
                    usages.append({"word": lemma, "sense": f"{synset.offset}{synset.pos}", "text": example,
                                   "span": [found.start(), found.end()]})
                    break
    return usages


def write_corpus(out_path: str | Path, synsets: list[Synset], max_documents: int = 0) -> Path:
    """A jsonl corpus ({"text": ...}): every example sentence, then every gloss."""
    texts = [e for s in synsets for e in s.examples] + [s.gloss for s in synsets if s.gloss]
    if max_documents:
        texts = texts[:max_documents]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tmp.replace(out)
    return out
