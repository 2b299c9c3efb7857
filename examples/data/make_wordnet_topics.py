"""Build the WordNet topic-classification demo data from the WordNet 3.0 noun database.

Each example is one WordNet noun sense: its dictionary definition is the text, and the
lexicographer file the sense belongs to (animal, plant, food, ...) is the label.

    apt-get install wordnet-base           # Debian/Ubuntu: puts the database in /usr/share/wordnet
    python examples/data/make_wordnet_topics.py [--wordnet-dir /usr/share/wordnet]

The output depends only on the input file: senses are ranked by a SHA-256 hash of their
synset offset, so the same database always yields byte-identical jsonl files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

# WordNet lexicographer file number -> label (see lexnames(5WN)).
TOPICS = {5: "animal", 6: "artifact", 8: "body", 13: "food", 15: "location",
          18: "person", 20: "plant", 27: "substance"}
TRAIN_PER_TOPIC = 400
EVAL_PER_TOPIC = 100
MIN_CHARS, MAX_CHARS = 20, 200   # drop stub and paragraph-long definitions
HERE = Path(__file__).resolve().parent


def read_senses(data_noun: Path) -> list[dict]:
    """Parse `data.noun` into {offset, word, text, label} for the senses in TOPICS."""
    senses = []
    with data_noun.open(encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("  "):        # licence header lines start with two spaces
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            topic = TOPICS.get(int(fields[1]))
            if topic is None:
                continue
            # A gloss is 'definition; "example"; "example"': keep the definition only.
            definition = gloss.strip().split('; "')[0].strip()
            if not MIN_CHARS <= len(definition) <= MAX_CHARS:
                continue
            senses.append({"offset": fields[0], "word": fields[4].replace("_", " "),
                           "text": definition, "label": topic})
    return senses


def split(senses: list[dict]) -> tuple[list[dict], list[dict]]:
    """Pick TRAIN_PER_TOPIC + EVAL_PER_TOPIC senses per topic, deterministically."""
    def rank(sense):
        return hashlib.sha256(sense["offset"].encode()).hexdigest()

    seen_texts: set[str] = set()   # identical definitions would leak between splits
    train, evaluation = [], []
    for topic in sorted(TOPICS.values()):
        chosen = []
        for sense in sorted((s for s in senses if s["label"] == topic), key=rank):
            if sense["text"] in seen_texts:
                continue
            seen_texts.add(sense["text"])
            chosen.append(sense)
            if len(chosen) == TRAIN_PER_TOPIC + EVAL_PER_TOPIC:
                break
        evaluation += chosen[:EVAL_PER_TOPIC]
        train += chosen[EVAL_PER_TOPIC:]
    # Interleave topics so that a file read in order is not sorted by label.
    return sorted(train, key=rank), sorted(evaluation, key=rank)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records atomically, one JSON object per line."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
        for r in records:
            handle.write(json.dumps({"text": r["text"], "label": r["label"], "word": r["word"]},
                                    ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)   # mkstemp creates owner-only files
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args()
    data_noun = args.wordnet_dir / "data.noun"
    if not data_noun.is_file():
        raise SystemExit(f"{data_noun} not found: install WordNet 3.0 (Debian package "
                         "'wordnet-base') or pass --wordnet-dir.")
    train, evaluation = split(read_senses(data_noun))
    write_jsonl(args.out_dir / "wordnet_topics_train.jsonl", train)
    write_jsonl(args.out_dir / "wordnet_topics_eval.jsonl", evaluation)
    print(f"wrote {len(train)} train and {len(evaluation)} eval examples "
          f"over {len(TOPICS)} topics to {args.out_dir}")


if __name__ == "__main__":
    main()
